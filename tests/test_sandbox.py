"""The code sandbox and the code-execution reward, tried as an attacker would (issue 25): verdicts the
code cannot forge, a box that does not reach the host, limits that hold for the whole job, nothing left
running. Runs on bubblewrap (tools/install_isolator.sh installs it); limits are small so the file takes
well under a minute.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import psutil
import pytest

from megatron_swift.rewards import code_harness, job_limits, sandbox
from megatron_swift.rewards.code import code_reward, extract_code, score_one
from megatron_swift.rewards.sandbox import (TRUNCATION_MARKER, SandboxJob, SandboxLimits, SandboxPool,
                                            SandboxUnavailable, run_python)
from megatron_swift.tasks.configs import SandboxConfig
from tests.conftest import ROOT

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=5, memory_mb=256, max_output_bytes=4096)
TIGHT = SandboxLimits(cpu_seconds=1, wall_seconds=1.5, memory_mb=256, max_output_bytes=4096)
CGROUP = isinstance(job_limits.detect(), job_limits.CgroupLimits)
ROOT_TRAINER = os.geteuid() == 0

ADD = "def add(a, b):\n    return a + b\n"
HALF = "def add(a, b):\n    return a + b if a < 10 else 0\n"
WRONG = "def add(a, b):\n    return 0\n"
ASSERTS = ["assert add(1, 2) == 3", "assert add(2, 5) == 7", "assert add(20, 1) == 21", "assert add(30, 3) == 33"]


def _md(code: str, lang: str = "python") -> str:
    return f"Here is my solution:\n```{lang}\n{code}```\nDone."


def _box_processes() -> list:
    """Processes of this test process's boxes still alive: its descendants, and whatever runs in its jobs'
    cgroups (a daemon that left the process tree). Other processes' boxes (a suite running beside) are not ours."""
    ours = f"msw-sandbox-{os.getpid()}/"
    found = [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    for proc in psutil.process_iter(["uids", "status"]):
        uid = proc.info["uids"].real if proc.info["uids"] else -1
        if proc.info["status"] == psutil.STATUS_ZOMBIE or not sandbox.DEFAULT_UID_BASE <= uid < sandbox.DEFAULT_UID_BASE + 4096:
            continue
        try:
            with open(f"/proc/{proc.pid}/cgroup") as f:
                if ours in f.read():
                    found.append(proc)
        except OSError:
            pass
    return found


def _assert_all_gone():
    assert _box_processes() == []


# ----------------------------------------------------------------------------- verdicts (reward hacks)

def test_correct_and_half_correct_solutions():
    io = [{"input": "1 2 3\n", "output": "6\n\n"}, {"input": "10 -3", "output": "7"}]
    echo_sum = "import sys\nnums = [int(x) for x in sys.stdin.read().split()]\nprint(sum(nums))   \n"
    completions = [_md(ADD), _md(HALF), "def add(a, b): return a + b   (no code block)", _md(echo_sum, lang=""),
                   _md("print(6)"), _md(ADD)]
    tests = [ASSERTS, ASSERTS, ASSERTS, io, io, []]
    rewards = code_reward([[]] * len(completions), completions, tests=tests, limits=FAST, workers=4)
    assert rewards == [1.0, 0.5, 0.0, 1.0, 0.5, 0.0]
    _assert_all_gone()


# Each of these passed every assert test before issue 25 without solving anything.
HACKS = {
    # print the harness's end marker (found in its own file) and leave before the asserts run
    "marker": "import os, re\nsrc = open(__file__).read()\nfor m in re.findall(r\"sandbox-tests-passed-[0-9a-f]+\", src):\n"
              "    print(m, flush=True)\nprint('sandbox-tests-passed', flush=True)\nos._exit(0)\n" + WRONG,
    # an excepthook that prints a pass and exits 0 when an assert fails
    "excepthook": "import sys, os\ndef hook(*a):\n    print('passed', flush=True)\n    os._exit(0)\n"
                  "sys.excepthook = hook\n" + WRONG,
    # an answer equal to everything
    "eq": "class Any:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
          "def add(a, b):\n    return Any()\n",
    # an int subclass equal to everything
    "int-eq": "class I(int):\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return I(0)\n",
    # shadow what the test itself calls
    "shadow": "import builtins\nbuiltins.AssertionError = type('X', (BaseException,), {})\n"
              "def abs(x):\n    return 0\nclass M:\n    def isclose(self, *a, **k):\n        return True\nmath = M()\n"
              "def add(a, b):\n    return 0\n",
    # exit 0 at import, and an atexit handler that prints a pass
    "exit": "import atexit, sys\natexit.register(lambda: print('all passed'))\nsys.exit(0)\n" + ADD,
}


@pytest.mark.parametrize("name", sorted(HACKS))
def test_reward_hacks_score_zero(name):
    tests = ASSERTS + ["assert abs(add(0.1, 0.2) - 0.3) < 1e-9", "import math\nassert math.isclose(add(1, 1), 2)"]
    assert score_one(HACKS[name], tests, FAST, workers=4) == 0.0


# Found by a review that attacked the first version of the harness (issue 25): the solution's code runs in
# the serving process, so it can send the harness a hello of its own, and map exceptions to builtins.
FORGED_HELLO = """
import sys, os, builtins, __main__ as H
def add(a, b):
    return 0
def fake(name):
    return (lambda *a, **k: True) if name in ("isinstance", "all", "any") else (lambda *a, **k: 0)
objects = H._Objects()
names = H._export({"add": add}, objects)
names["__builtins__"] = {"value": {"$dict": [[n, {"$ref": objects.add(fake(n))}] for n in dir(builtins)
                                            if not n.startswith("__") or n == "__import__"]}}
channel = H.Channel(sys.argv[2], sys.argv[3])
channel.send({"ready": True, "names": names})
while True:
    try:
        request = channel.receive()
    except Exception:
        os._exit(0)
    try:
        reply = H._handle(request, objects)
    except BaseException as e:
        reply = {"error": [type(e).__name__, str(e)]}
    channel.send(reply)
"""


@pytest.mark.parametrize("code", [FORGED_HELLO, "def add(a, b):\n    raise StopIteration\n"],
                         ids=["forged-hello", "stop-iteration"])
def test_forged_hello_and_exceptions_do_not_pass(code):
    tests = ["import math\nassert math.isclose(add(0.1, 0.2), 0.3)", "assert abs(add(0.1, 0.2) - 0.3) < 1e-9",
             "for a in range(3):\n    assert add(a, a) == 2 * a", "assert all(map(lambda c: add(*c) == sum(c), [(1, 2)]))",
             "assert all(add(a, b) == a + b for a, b in [(1, 2)])", "assert isinstance(add(1, 2), int) and add(1, 2) == 3"]
    assert score_one(code, tests, FAST, workers=4) == 0.0


def test_dataset_search_hack_scores_zero(tmp_path):
    """The code looks for the data set's expected outputs on disk: they never enter the box."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"tests": [{"input": "5 7", "output": "secret-answer-8841"}]}) + "\n")
    search = ("import os, json, sys\nsys.stdin.read()\nfor root, dirs, files in os.walk('/'):\n"
              "    for f in files:\n        try:\n            text = open(os.path.join(root, f)).read()\n"
              "        except Exception:\n            continue\n        if 'secret-answer' in text:\n"
              "            print(json.loads(text.splitlines()[0])['tests'][0]['output'])\n            raise SystemExit\n")
    assert score_one(search, [{"input": "5 7", "output": "secret-answer-8841"}], FAST) == 0.0


def test_timeouts_and_crashes_fail_in_the_denominator():
    code = ADD + "import time\ndef slow():\n    time.sleep(60)\ndef crash():\n    import os; os._exit(1)\n"
    tests = ["assert add(1, 1) == 2", "slow()", "crash()", "this is not python"]
    assert score_one(code, tests, TIGHT, workers=4) == 0.25


def test_harness_features():
    """What test suites of real data sets use: classes, in-place functions, expected exceptions, HumanEval's
    check(candidate), the solution's imports, generators and big integers."""
    code = ("import math\nclass Solution:\n    def two_sum(self, nums, t):\n"
            "        seen = {}\n        for i, n in enumerate(nums):\n            if t - n in seen:\n"
            "                return [seen[t - n], i]\n            seen[n] = i\n"
            "def rotate(nums, k):\n    nums[:] = nums[-k:] + nums[:-k]\n"
            "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return math.sqrt(x)\n"
            "def evens(n):\n    yield from range(0, n, 2)\nBIG = 2 ** 20000\n")
    tests = ["assert Solution().two_sum([2, 7, 11], 9) == [0, 1]",
             "n = [1, 2, 3]\nrotate(n, 1)\nassert n == [3, 1, 2]",
             "try:\n    root(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no error')",
             "def check(candidate):\n    assert candidate(9) == 3.0\ncheck(root)",
             "assert math.isclose(root(2), 1.41421356, rel_tol=1e-6)",
             "assert list(evens(7)) == [0, 2, 4, 6]",
             "assert BIG % 1000 == 2 ** 20000 % 1000 and isinstance(BIG, int)",
             "assert (1, 'a') in {(1, 'a'): 2} and {b'x'} == {b'x'}"]
    assert score_one(code, tests, FAST, workers=4) == 1.0


def test_codec_rebuilds_exact_types():
    value = {(1, "a"): [1.5, None, True, b"x", bytearray(b"y"), frozenset({2}), {3}, 1 + 2j, float("inf")]}
    back = code_harness.decode(json.loads(json.dumps(code_harness.encode(value))))
    assert back == value and type(next(iter(back))) is tuple
    with pytest.raises(code_harness.NotPlainData):
        code_harness.decode({"$eval": "1"})
    with pytest.raises(code_harness.NotPlainData):
        code_harness.encode(object())
    remote = code_harness.Remote(0, None)
    for compare in (lambda: remote == 1, lambda: remote != 1, lambda: bool(remote), lambda: hash(remote),
                    lambda: 1 < remote):
        with pytest.raises(TypeError):
            compare()


def test_test_row_shapes():
    # APPS-style dict, JSON string, a single string of asserts, a conversational completion
    apps = {"inputs": ["2 3\n", "5 5\n"], "outputs": ["5\n", "10\n"]}
    code = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert score_one(code, apps, FAST, workers=2) == 1.0
    assert score_one(code, json.dumps(apps), FAST) == 1.0
    assert score_one(ADD, "assert add(1, 1) == 2\nassert add(0, 0) == 0", FAST) == 1.0
    assert score_one(None, ["assert True"], FAST) == 0.0
    assert score_one(ADD, [{"bad": "item"}, "assert add(1, 1) == 2"], FAST) == 0.5
    assert code_reward([[]], [[{"role": "assistant", "content": _md(ADD)}]], tests=[["assert add(1, 1) == 2"]],
                       limits=FAST) == [1.0]
    assert code_reward([[]], [_md(ADD)], limits=FAST) == [0.0]  # no tests column


def test_extract_code():
    text = "```python\nfirst()\n```\nthen\n```py\nsecond()\n```\n```bash\nrm -rf /\n```\n```python\nunclosed("
    assert extract_code(text) == "second()\n"
    assert extract_code("```\nplain()\n```") == "plain()\n"
    assert extract_code("```python title=x\nx = 1\n```") == "x = 1\n"
    assert extract_code("no code here") is None
    assert extract_code("```bash\nls\n```") is None
    assert extract_code("```python\n   \n```") is None


# --------------------------------------------------------------------------------- the host out of reach

def test_host_files_devices_and_secrets_are_out_of_reach(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-1234")
    secret = tmp_path / "root-only.txt"
    secret.write_text("top-secret-0600")
    secret.chmod(0o600)
    code = f"""
import os, glob
def readable(path):
    try:
        with open(path, 'rb') as f:
            f.read(1)
        return True
    except OSError:
        return False
seen = []
for root, dirs, files in os.walk('/'):
    if root.startswith(('/proc', '/usr', '/dev', '/opt/python')):
        dirs[:] = []
        continue
    seen += [os.path.join(root, f) for f in files]
env = b''.join(open(p, 'rb').read() for p in glob.glob('/proc/[0-9]*/environ') if readable(p))
print(os.getuid(), os.getpid(), sorted(os.listdir('/proc'))[:3])
print(sorted(seen))
print([p for p in ({str(secret)!r}, {str(ROOT / 'README.md')!r}, '/dev/kmsg', '/dev/kvm', '/dev/mem', '/etc/shadow',
                   '/proc/1/mem', '/root/.bash_history') if readable(p)])
print(b'secret' in env, sorted(os.listdir('/dev')), open('/proc/self/status').read().count('CapEff:\\t0000000000000000'))
"""
    result = run_python(code, limits=FAST)
    assert result.ok, result
    ids, files, readable, last = result.stdout.splitlines()
    uid, pid = ids.split()[:2]
    assert pid == "2" and (uid != "0" or not ROOT_TRAINER)
    assert eval(files) == ["/tmp/main.py"]  # noqa: S307 - our own print of a list: the box's only file
    assert eval(readable) == []  # noqa: S307
    assert last == "False ['null', 'urandom', 'zero'] 1"


def test_audit_hook_bypass_reaches_nothing():
    """The old escape (a fresh _posixsubprocess under a dotted name runs /bin/sh past the audit hook) now
    runs a shell in the box: it sees only the box."""
    code = """
import _posixsubprocess, importlib.machinery, importlib.util, os
if getattr(_posixsubprocess, '__file__', None):  # built into some interpreters
    loader = importlib.machinery.ExtensionFileLoader('zz._posixsubprocess', _posixsubprocess.__file__)
    loader.exec_module(importlib.util.module_from_spec(importlib.util.spec_from_loader('zz._posixsubprocess', loader)))
out = os.popen('ls /; echo ---; ls /root /home 2>&1; id -u; cat /etc/hostname 2>&1').read()
print(out)
"""
    result = run_python(code, limits=FAST)
    assert result.ok, result
    listing = result.stdout.split("---")[0].split()
    assert set(listing) <= {"bin", "dev", "lib", "lib64", "lib32", "libx32", "sbin", "proc", "opt", "tmp", "usr"}
    assert "cannot access '/home'" in result.stdout and "/etc/hostname: No such file" in result.stdout


def test_kernel_surfaces_are_filtered():
    """No namespaces of its own (root inside them: kernel attack surface), no keyring (it outlives the box:
    a channel from one job to the next), a stdin that cannot write to or reserve the host's disk."""
    code = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(*args):
    rc = libc.syscall(*args)
    return "ok" if rc >= 0 else os.strerror(ctypes.get_errno())
print(call(272, 0x10000000))                                  # unshare(CLONE_NEWUSER)
print(call(248, b"user", b"msw", b"from job 1", 10, -4))      # add_key to the user keyring
print(call(285, 0, 1, ctypes.c_long(0), ctypes.c_long(1 << 30)))  # fallocate(stdin, KEEP_SIZE, 1 GiB)
print(os.popen("unshare -Urn true 2>&1 || echo refused").read().strip().splitlines()[-1])
try:
    os.write(0, b"x")
    print("stdin written")
except OSError as e:
    print(os.strerror(e.errno))
"""
    if os.uname().machine != "x86_64":
        pytest.skip("the raw system-call numbers above are x86-64's")
    result = run_python(code, "input", limits=FAST)
    assert result.ok, result
    assert result.stdout.split("\n")[:5] == ["Operation not permitted", "Operation not permitted",
                                              "Bad file descriptor", "refused", "Bad file descriptor"], result.stdout


def _listen(kind, address):
    server = socket.socket(kind, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(8)
    server.settimeout(0.2)
    got = []

    def accept():
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            try:
                conn, _ = server.accept()
                got.append(conn.recv(100))
                conn.close()
            except OSError:
                pass
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return server, got, thread


def test_host_sockets_and_network_receive_nothing(tmp_path):
    path = f"/tmp/msw-test-{uuid.uuid4().hex[:8]}.sock"
    unix, unix_got, t1 = _listen(socket.AF_UNIX, path)
    abstract_name = f"\0msw-test-{uuid.uuid4().hex[:8]}"
    abstract, abstract_got, t2 = _listen(socket.AF_UNIX, abstract_name)
    tcp, tcp_got, t3 = _listen(socket.AF_INET, ("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    code = f"""
import socket
tried = []
for family, address in ((socket.AF_UNIX, {path!r}), (socket.AF_UNIX, {abstract_name!r}),
                        (socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_INET, ('8.8.8.8', 53))):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(address)
        s.sendall(b'hello from the box')
        tried.append('connected')
    except OSError as e:
        tried.append(type(e).__name__)
print(tried)
"""
    try:
        result = run_python(code, limits=FAST)
        time.sleep(0.3)
    finally:
        for server in (unix, abstract, tcp):
            server.close()
        os.unlink(path)
    assert result.ok, result
    assert "connected" not in result.stdout, result.stdout
    assert unix_got == abstract_got == tcp_got == []


# ------------------------------------------------------------------------------------ limits per job

DAEMONS = ("import os, time\n"
           "for _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
           "        if os.fork() == 0:\n            os.execv('/bin/sleep', ['sleep', '31.4159'])\n        os._exit(0)\n")


@pytest.mark.parametrize("tail", ["time.sleep(60)\n", "os._exit(0)\n"], ids=["killed-at-wall-time", "main-exits"])
def test_daemons_do_not_survive_the_job(tail):
    result = run_python(DAEMONS + tail, limits=TIGHT)
    assert result.reason in ("wall time", ""), result
    assert not [p for p in psutil.process_iter(["cmdline"]) if "31.4159" in (p.info["cmdline"] or [])]
    _assert_all_gone()


def test_fork_bomb_is_bounded_by_the_job_limit():
    """As root too (RLIMIT_NPROC does not bind root): a box's uid and cgroup count its processes."""
    code = ("import os, time\nn = 0\nfor i in range(200):\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(n, flush=True)\n")
    limits = SandboxLimits(cpu_seconds=2, wall_seconds=3, memory_mb=256, max_processes=8)
    result = run_python(code, limits=limits)
    assert result.ok, result
    assert int(result.stdout) < limits.max_processes
    _assert_all_gone()


@pytest.mark.skipif(not CGROUP, reason="no writable cgroup here: memory is limited per process only")
def test_memory_split_across_processes_is_bounded():
    """Four processes of 200 MB each against a 256 MB job: at most one gets its memory."""
    code = """
import os, sys, time
r, w = os.pipe()
for i in range(4):
    if os.fork() == 0:
        block = bytearray(200 * 1024 * 1024)
        for j in range(0, len(block), 4096):
            block[j] = 1
        os.write(w, b'x')
        time.sleep(3)
        os._exit(0)
os.close(w)
time.sleep(2.5)
os.set_blocking(r, False)
try:
    print(len(os.read(r, 10)))
except BlockingIOError:
    print(0)
"""
    limits = SandboxLimits(cpu_seconds=4, wall_seconds=6, memory_mb=256, max_disk_mb=8)
    result = run_python(code, limits=limits)
    assert result.stdout.strip() in ("0", "1"), result
    _assert_all_gone()


def test_memory_bomb_is_contained():
    rss_before = psutil.Process().memory_info().rss
    result = run_python("x = []\nwhile True:\n    x.append(' ' * 10 ** 7)", limits=TIGHT)
    assert result.returncode != 0 and result.reason in ("memory", "killed"), result
    assert score_one(ADD + "x = bytearray(8 * 1024 ** 3)\n", ["assert add(1, 2) == 3"], TIGHT) == 0.0
    assert psutil.Process().memory_info().rss - rss_before < 64 * 1024 * 1024


def test_disk_fill_is_bounded():
    code = ("import os\nwritten = 0\ntry:\n    for i in range(300):\n        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(b'x' * 1024 * 1024)\n        written += 1\nexcept OSError as e:\n    print(type(e).__name__)\n"
            "print(written)\n")
    limits = SandboxLimits(cpu_seconds=4, wall_seconds=8, max_disk_mb=16, max_file_mb=4)
    result = run_python(code, limits=limits)
    assert result.ok, result
    error, written = result.stdout.split()
    assert error == "OSError" and int(written) <= limits.max_disk_mb
    big = run_python("open('big', 'wb').write(b'x' * 8 * 1024 * 1024)", limits=limits)
    assert big.returncode != 0  # over max_file_mb: SIGXFSZ


def test_file_descriptors_are_bounded():
    code = "fds = []\ntry:\n    for i in range(20000):\n        fds.append(open('/dev/null'))\nexcept OSError:\n    pass\nprint(len(fds))\n"
    result = run_python(code, limits=FAST)
    assert result.ok and int(result.stdout) < FAST.max_open_files, result


def test_wall_time_and_busy_loops():
    result = run_python("import time\nwhile True:\n    time.sleep(1)\n", limits=TIGHT)
    assert result.timed_out and result.reason == "wall time", result
    assert TIGHT.wall_seconds <= result.duration < TIGHT.wall_seconds + 1.0
    result = run_python("while True:\n    pass\n", limits=TIGHT)
    assert result.timed_out and result.reason in ("cpu time", "wall time"), result
    _assert_all_gone()


def test_huge_output_is_cut_and_the_job_killed():
    result = run_python("import sys\nwhile True:\n    print('x' * 10 ** 6)\n    sys.stderr.write('y' * 10 ** 6)\n",
                        limits=TIGHT)
    assert result.reason == "output truncated", result
    assert result.stdout.endswith(TRUNCATION_MARKER)
    assert len(result.stdout) <= TIGHT.max_output_bytes + len(TRUNCATION_MARKER)
    assert result.duration < TIGHT.wall_seconds


# ------------------------------------------------------------------------------- the box works

def test_common_code_still_runs():
    code = """
import asyncio, collections, dataclasses, json, math, subprocess, tempfile, threading
async def f():
    return 3
@dataclasses.dataclass
class P:
    x: int
with tempfile.NamedTemporaryFile("w", delete=False) as t:
    t.write("kept in the workdir")
results = []
th = threading.Thread(target=results.append, args=(1,)); th.start(); th.join()
child = subprocess.run(['/bin/echo', 'child'], capture_output=True, text=True).stdout.strip()
print(asyncio.run(f()), P(1).x, math.isqrt(17), open(t.name).read(), results, child, input())
"""
    result = run_python(code, "from stdin\n", limits=FAST)
    assert result.ok and result.stdout == "3 1 4 kept in the workdir [1] child from stdin\n", result


def test_the_box_runs_the_trainers_own_python_without_its_packages():
    import sys

    result = run_python("import sys, os\nprint(sys.version)\nprint([os.listdir(p) for p in sys.path if os.path.isdir(p)"
                        " and 'site-packages' in p])\nimport torch", limits=FAST)
    version, packages = result.stdout.splitlines()[:2]
    assert version == sys.version and packages == "[]", result
    assert "No module named 'torch'" in result.stderr


def test_environment_is_fixed():
    result = run_python("import json, os\nprint(json.dumps(dict(os.environ)))\n", limits=FAST)
    env = json.loads(result.stdout)
    assert env["HOME"] == env["TMPDIR"] == "/tmp" and env["PATH"] == "/usr/bin:/bin"
    assert set(env) <= {"PATH", "LANG", "HOME", "TMPDIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                        "MKL_NUM_THREADS", "LC_CTYPE", "PWD", "LD_LIBRARY_PATH"}


def test_pool_keeps_order():
    jobs = [SandboxJob(f"import time\ntime.sleep({(5 - i) * 0.05})\nprint({i})") for i in range(6)]
    jobs += ["print('plain')", ("print(input()[::-1])", "abc\n")]
    with SandboxPool(workers=3, limits=FAST) as pool:
        results = pool.map(jobs)
    assert [r.stdout.strip() for r in results] == ["0", "1", "2", "3", "4", "5", "plain", "cba"]
    assert all(r.ok for r in results)


def test_isolation_none_is_explicit_and_said():
    result = run_python("import os\nprint(os.getpid() != 2)", limits=FAST, isolation="none")
    assert result.ok and result.stdout.strip() == "True"
    assert "NOT ISOLATED" in sandbox.describe("none")
    assert "bubblewrap" in sandbox.describe("bwrap") and "job limits by" in sandbox.describe("bwrap")
    with pytest.raises(SandboxUnavailable, match="isolation must be one of"):
        SandboxPool(1, FAST, isolation="docker")


def test_missing_isolator_refuses_with_the_install_line(monkeypatch):
    monkeypatch.setattr(sandbox, "_probes", {})
    monkeypatch.setenv("PATH", "/nonexistent")
    problem = sandbox.isolation_problem("bwrap")
    assert problem.startswith("the code sandbox cannot start: bubblewrap (bwrap) is not installed")
    assert "apt-get install bubblewrap" in problem and "task.sandbox.isolation=none" in problem
    with pytest.raises(SandboxUnavailable):
        SandboxPool(1, FAST)


def test_config_limits_are_the_sandbox_limits():
    """task.sandbox.* carries every SandboxLimits field with the same default (scoring builds one from it)."""
    config = SandboxConfig()
    for name, spec in SandboxLimits.__dataclass_fields__.items():
        assert getattr(config, name) == spec.default, name
    assert config.uid_base == sandbox.DEFAULT_UID_BASE and config.isolation == "bwrap"


def test_a_box_that_cannot_start_gives_back_what_it_took(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no process for you")

    pool = SandboxPool(1, FAST)
    monkeypatch.setattr(sandbox.subprocess, "Popen", refuse)
    fds_before = len(os.listdir("/proc/self/fd"))
    results = pool.map(["print(1)"] * 3)
    assert all(r.returncode == -1 and r.reason.startswith("sandbox error") for r in results), results
    assert len(os.listdir("/proc/self/fd")) == fds_before
    uids = pool._runner.uids
    assert uids is None or not uids._held
    pool.close()
