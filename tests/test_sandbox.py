"""The code sandbox and the code-execution reward: scores, limits, containment, cleanup.

Every behaviour is checked in both isolation modes ("namespaces" skips where the kernel refuses
user namespaces). Cases marked "kernel boundary" switch the audit hook off to show that the
namespaces alone contain the code. Limits are small so the file runs in well under a minute.
"""
from __future__ import annotations

import dis
import importlib.util
import json
import os
import resource
import socket
import tempfile
import time
import types
import uuid

import psutil
import pytest

from megatron_swift.rewards import sandbox
from megatron_swift.rewards.code import code_reward, extract_code, score_one
from megatron_swift.rewards.sandbox import (TRUNCATION_MARKER, SandboxJob, SandboxLimits, SandboxPool,
                                            run_python)

FAST = SandboxLimits(cpu_seconds=2, wall_seconds=5, memory_mb=256, max_output_bytes=4096)
TIGHT = SandboxLimits(cpu_seconds=1, wall_seconds=1.5, memory_mb=256, max_output_bytes=4096)


def _skip_without_namespaces():
    available, why = sandbox.namespace_support()
    if not available:
        pytest.skip(f"namespace isolation unavailable here: {why}")


@pytest.fixture(params=["namespaces", "none"])
def isolate(request):
    if request.param == "namespaces":
        _skip_without_namespaces()
    return request.param


@pytest.fixture(params=[("namespaces", True), ("none", True), ("namespaces", False)],
                ids=["namespaces", "none", "kernel-boundary"])
def guard(request):
    """(isolate, audit hook on): both modes, plus namespaces without the hook ("kernel boundary")."""
    if request.param[0] == "namespaces":
        _skip_without_namespaces()
    return request.param


@pytest.fixture
def namespaces():
    _skip_without_namespaces()
    return "namespaces"


def _survivors(workdir: str) -> list:
    """Processes still alive from the run that worked in ``workdir`` (its path is on their command line)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if workdir in " ".join(proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


def _assert_all_gone(result):
    workdir = result.stdout.split()[0]
    assert workdir.startswith("/") and "msw-sandbox-" in workdir, result
    assert not os.path.exists(workdir), "the working directory was not removed"
    assert _survivors(workdir) == []
    assert psutil.Process().children(recursive=True) == []


# ----------------------------------------------------------------------------------------- the reward

ADD = "def add(a, b):\n    return a + b\n"
HALF = "def add(a, b):\n    return a + b if a < 10 else 0\n"
ECHO_SUM = "import sys\nnums = [int(x) for x in sys.stdin.read().split()]\nprint(sum(nums))   \n"


def _md(code: str, lang: str = "python") -> str:
    return f"Here is my solution:\n```{lang}\n{code}```\nDone."


def test_code_reward_scores(isolate):
    asserts = ["assert add(1, 2) == 3", "assert add(2, 5) == 7", "assert add(20, 1) == 21", "assert add(30, 3) == 33"]
    io = [{"input": "1 2 3\n", "output": "6\n\n"}, {"input": "10 -3", "output": "7"}]
    completions = [
        _md(ADD),                                               # all pass
        _md(HALF),                                              # 2 of 4
        "def add(a, b): return a + b   (no code block)",      # nothing to run
        _md(ECHO_SUM, lang=""),                                 # stdin/stdout, untagged fence
        _md("print(6)"),                                        # 1 of 2 stdin/stdout
        _md("import sys\nsys.exit(0)\n" + ADD),                 # exits before the asserts run
        _md(ADD),                                               # no tests for this row
        _md("import os\nos._exit(0)\n"),                        # same trick, harder exit
    ]
    tests = [asserts, asserts, asserts, io, io, asserts, [], json.dumps(asserts)]
    rewards = code_reward([[]] * len(completions), completions, tests=tests, limits=FAST, workers=4,
                          isolate=isolate, solution=[None] * len(completions))
    assert rewards == [1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0]


def test_test_row_shapes():
    # APPS-style dict, JSON string, a single string of asserts, a conversational completion
    apps = {"inputs": ["2 3\n", "5 5\n"], "outputs": ["5\n", "10\n"]}
    code = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert score_one(code, apps, FAST, "none", workers=2) == 1.0
    assert score_one(code, json.dumps(apps), FAST, "none") == 1.0
    assert score_one(ADD, "assert add(1, 1) == 2\nassert add(0, 0) == 0", FAST, "none") == 1.0
    assert score_one(None, ["assert True"], FAST, "none") == 0.0
    assert score_one(ADD, [{"bad": "item"}, "assert add(1, 1) == 2"], FAST, "none") == 0.5
    assert code_reward([[]], [[{"role": "assistant", "content": _md(ADD)}]], tests=[["assert add(1, 1) == 2"]],
                       limits=FAST, isolate="none") == [1.0]
    assert code_reward([[]], [_md(ADD)], limits=FAST, isolate="none") == [0.0]  # no tests column


def test_extract_code():
    text = "```python\nfirst()\n```\nthen\n```py\nsecond()\n```\n```bash\nrm -rf /\n```\n```python\nunclosed("
    assert extract_code(text) == "second()\n"
    assert extract_code("```\nplain()\n```") == "plain()\n"
    assert extract_code("```python title=x\nx = 1\n```") == "x = 1\n"
    assert extract_code("no code here") is None
    assert extract_code("```bash\nls\n```") is None
    assert extract_code("```python\n   \n```") is None


# ------------------------------------------------------------------------------------------- limits

def test_sleeping_code_is_killed_at_wall_time(isolate):
    result = run_python("import os, time\nprint(os.getcwd(), flush=True)\nwhile True:\n    time.sleep(1)\n",
                        limits=TIGHT, isolate=isolate)
    assert result.timed_out and result.reason == "wall time", result
    assert TIGHT.wall_seconds <= result.duration < TIGHT.wall_seconds + 1.0
    _assert_all_gone(result)


def test_busy_loop_is_killed_and_scores_zero(isolate):
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", limits=TIGHT, isolate=isolate)
    assert result.timed_out and result.reason in ("cpu time", "wall time"), result
    assert result.duration < TIGHT.wall_seconds + 1.0
    assert score_one(ADD + "while True:\n    pass\n", ["assert add(1, 2) == 3"], TIGHT, isolate) == 0.0
    assert time.monotonic() - start < 2 * TIGHT.wall_seconds + 2.0


@pytest.mark.parametrize("bomb", ["x = bytearray(8 * 1024 ** 3)", "x = []\nwhile True:\n    x.append(' ' * 10 ** 7)"])
def test_memory_bomb_is_contained(isolate, bomb):
    rss_before = psutil.Process().memory_info().rss
    result = run_python(bomb, limits=TIGHT, isolate=isolate)
    assert result.returncode != 0 and result.reason == "memory", result
    assert "MemoryError" in result.stderr
    assert score_one(ADD + bomb, ["assert add(1, 2) == 3"], TIGHT, isolate) == 0.0
    assert psutil.Process().memory_info().rss - rss_before < 64 * 1024 * 1024


def test_huge_output_is_truncated_and_memory_bounded(isolate):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    result = run_python("import sys\nwhile True:\n    print('x' * 10 ** 6)\n    sys.stderr.write('y' * 10 ** 6)\n",
                        limits=TIGHT, isolate=isolate)
    assert result.reason == "output truncated", result
    assert result.stdout.endswith(TRUNCATION_MARKER)
    assert len(result.stdout) <= TIGHT.max_output_bytes + len(TRUNCATION_MARKER)
    assert len(result.stderr) <= TIGHT.max_output_bytes + len(TRUNCATION_MARKER)
    assert result.duration < TIGHT.wall_seconds  # stopped at the limit, not at wall time
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 32 * 1024


# -------------------------------------------------------------------------------------- containment

FORK_BOMB = "import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    os.fork()\n"
SPAWN_SPAM = ("import os, subprocess, sys\nprint(os.getcwd(), flush=True)\n"
              "while True:\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n")


@pytest.mark.parametrize("code", [FORK_BOMB, SPAWN_SPAM], ids=["fork", "subprocess"])
def test_fork_bomb_is_contained(isolate, code):
    result = run_python(code, limits=TIGHT, isolate=isolate)
    assert result.returncode != 0
    assert "sandbox: creating processes is not allowed" in result.stderr
    _assert_all_gone(result)


# setsid + double fork: daemons that leave the process group; only the pid namespace catches them
DAEMONS = ("import os, time\nprint(os.getcwd(), flush=True)\n"
           "for _ in range(5):\n    if os.fork() == 0:\n        os.setsid()\n"
           "        if os.fork() == 0:\n            time.sleep(60)\n        os._exit(0)\n")


@pytest.mark.parametrize("tail", ["time.sleep(60)\n", "os._exit(0)\n"], ids=["killed-at-wall-time", "main-exits"])
def test_kernel_boundary_kills_escaping_daemons(namespaces, tail):
    result = run_python(DAEMONS + tail, limits=TIGHT, isolate=namespaces, _audit_hook=False)
    _assert_all_gone(result)


def _write_attempts(tmp_path, in_cwd, beside_workdir):
    new, existing = tmp_path / "new.txt", tmp_path / "existing.txt"
    existing.write_text("original")
    code = f"""
import os
def attempt(name, fn):
    try:
        fn()
        print(name, "DONE")
    except Exception as e:
        print(name, "refused", type(e).__name__)
attempt("inside", lambda: open("mine.txt", "w").write("ok"))
attempt("new", lambda: open({str(new)!r}, "w").write("pwned"))
attempt("overwrite", lambda: open({str(existing)!r}, "w").write("pwned"))
attempt("append", lambda: open({str(existing)!r}, "a").write("pwned"))
attempt("os.open", lambda: os.write(os.open({str(existing)!r}, os.O_WRONLY | os.O_TRUNC), b"pwned"))
attempt("remove", lambda: os.remove({str(existing)!r}))
attempt("rename", lambda: os.rename({str(existing)!r}, {str(new)!r}))
attempt("trainer-cwd", lambda: open({in_cwd!r}, "w").write("pwned"))
attempt("relative", lambda: open("../escape-{uuid.uuid4().hex}.txt", "w").write("pwned"))
attempt("symlink", lambda: (os.symlink({str(tmp_path)!r}, "link"), open("link/via-link.txt", "w").write("pwned")))
def via_dir_fd():  # a descriptor of the workdir and a deeper cwd: '../x' looks inside but is not
    fd = os.open(".", os.O_RDONLY)
    os.makedirs("a/b")
    os.chdir("a/b")
    os.write(os.open("../{beside_workdir}", os.O_CREAT | os.O_WRONLY, dir_fd=fd), b"pwned")
attempt("dir_fd", via_dir_fd)
attempt("mknod", lambda: os.mknod({str(tmp_path / "node")!r}))
attempt("chdir", lambda: (os.chdir({str(tmp_path)!r}), open("via-chdir.txt", "w").write("pwned")))
"""
    return code, new, existing


def test_writes_outside_the_workdir_have_no_effect(guard, tmp_path):
    isolate, hook = guard
    in_cwd = os.path.join(os.getcwd(), f"sandbox-escape-{uuid.uuid4().hex}.txt")
    beside_workdir = f"sandbox-escape-{uuid.uuid4().hex}.txt"  # in the directory holding the workdirs
    code, new, existing = _write_attempts(tmp_path, in_cwd, beside_workdir)
    try:
        result = run_python(code, limits=FAST, isolate=isolate, _audit_hook=hook)
        lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
        assert lines.pop("inside") == "DONE", result
        assert len(lines) == 12 and all(v.startswith("refused") for v in lines.values()), result
        assert not new.exists() and existing.read_text() == "original"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt"]
        assert not os.path.exists(in_cwd)
        assert not os.path.exists(os.path.join(tempfile.gettempdir(), beside_workdir))
    finally:
        for leftover in (in_cwd, os.path.join(tempfile.gettempdir(), beside_workdir)):
            if os.path.exists(leftover):
                os.remove(leftover)


def test_no_network(guard):
    isolate, hook = guard
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = (f"import socket\ntry:\n    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n    s.settimeout(2)\n"
                f"    s.connect(('127.0.0.1', {port}))\n    print('CONNECTED')\n"
                f"except Exception as e:\n    print('refused', type(e).__name__, e)\n")
        result = run_python(code, limits=FAST, isolate=isolate, _audit_hook=hook)
        assert result.stdout.startswith("refused"), result
        listener.settimeout(0.3)
        with pytest.raises(socket.timeout):
            listener.accept()


def test_kernel_boundary_properties(namespaces):
    """Without the hook: no capabilities, only its own processes visible, the trainer out of reach."""
    code = f"""
import ctypes, os, signal
status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())
print(status['CapEff'].strip(), status['CapBnd'].strip(), os.getpid())
print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
try:
    os.kill({os.getpid()}, 0)
    print('reached the trainer')
except ProcessLookupError:
    print('trainer not visible')
libc = ctypes.CDLL(None, use_errno=True)
print('remount', libc.mount(None, b'/', None, 32 | 4096 | 16384, None), ctypes.get_errno())  # MS_REMOUNT|MS_BIND|MS_REC
"""
    result = run_python(code, limits=FAST, isolate=namespaces, _audit_hook=False)
    lines = result.stdout.splitlines()
    assert lines[0] == "0000000000000000 0000000000000000 2", result
    assert lines[1] == "[1, 2]"
    assert lines[2] == "trainer not visible"
    assert lines[3] == "remount -1 1"  # EPERM


def test_hook_cannot_be_patched_or_bypassed(isolate):
    code = """
import builtins, os, posixpath
posixpath._joinrealpath = lambda *a: ('/nowhere', True)
os.path.realpath = lambda p: os.getcwd() + '/x'
builtins.len = lambda x: 0
class Sneaky(str):
    def startswith(self, *a): return True
    def __eq__(self, other): return False
    __hash__ = str.__hash__
for name, fn in [("write", lambda: open(Sneaky('/tmp/sneaky-%d.txt' % os.getpid()), 'w')),
                 ("ctypes", lambda: __import__(Sneaky('ctypes'))),
                 ("gc", lambda: __import__('gc').get_objects()),
                 ("rlimit", lambda: __import__('resource').setrlimit(__import__('resource').RLIMIT_CPU, (100, 100))),
                 ("kill", lambda: os.kill(1, 0))]:
    try:
        fn()
        print(name, "DONE")
    except Exception as e:
        print(name, type(e).__name__, e)
"""
    result = run_python(code, limits=FAST, isolate=isolate)
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and all("sandbox:" in line for line in lines), result
    assert lines[1].startswith("ctypes ImportError")


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device node needs root")
def test_device_nodes_are_refused():
    """As root outside namespaces, a fresh posix module (from _imp) has the real mknod: the open is refused."""
    code = """
import _imp, importlib.util, os, stat
posix = _imp.create_builtin(importlib.util.find_spec("posix"))
posix.mknod("disk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
open("disk", "rb")
"""
    result = run_python(code, limits=FAST, isolate="none")
    assert "PermissionError: sandbox: opening device files is not allowed" in result.stderr, result


def test_hook_reads_no_globals():
    """The hook's functions use only closure variables: user code shares __main__'s globals and builtins."""
    bootstrap = compile(sandbox._BOOTSTRAP, "<bootstrap>", "exec")
    make_hook = next(c for c in bootstrap.co_consts if isinstance(c, types.CodeType) and c.co_name == "_make_hook")

    def nested(code):
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                yield const
                yield from nested(const)

    functions = list(nested(make_hook))
    assert {f.co_name for f in functions} >= {"hook", "resolve", "check_open", "check_import", "inside"}
    for function in functions:
        globals_used = {i.argval for i in dis.get_instructions(function) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
        assert not globals_used, f"{function.co_name} reads globals {globals_used}"


def test_common_code_still_runs(isolate):
    code = """
import asyncio, collections, dataclasses, enum, json, math, tempfile, threading
async def f():
    return 3
@dataclasses.dataclass
class P:
    x: int
with tempfile.NamedTemporaryFile("w", delete=False) as t:
    t.write("kept in the workdir")
results = []
th = threading.Thread(target=results.append, args=(1,)); th.start(); th.join()
print(asyncio.run(f()), P(1).x, math.isqrt(17), open(t.name).read(), results, open('/dev/null', 'w').write('x'))
"""
    result = run_python(code, limits=FAST, isolate=isolate)
    assert result.ok and result.stdout == "3 1 4 kept in the workdir [1] 1\n", result
    if importlib.util.find_spec("numpy") is None:
        return
    result = run_python("import numpy as np\nprint(int(np.arange(10).sum()))", limits=FAST, isolate=isolate)
    assert result.ok and result.stdout == "45\n", result  # numpy imports although ctypes is refused


# ------------------------------------------------------------------------------- environment, cleanup

def test_environment_is_scrubbed(isolate, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-1234")
    monkeypatch.setenv("HF_TOKEN", "hf-secret-5678")
    result = run_python("import json, os\nprint(os.getcwd())\nprint(json.dumps(dict(os.environ)))\n"
                        "print(open('/proc/self/environ', 'rb').read().decode())\n", limits=FAST, isolate=isolate)
    assert result.ok, result
    workdir, env_json, proc_env = result.stdout.split("\n", 2)
    env = json.loads(env_json)
    assert "secret" not in result.stdout
    assert env["HOME"] == env["TMPDIR"] == workdir and env["PATH"] == "/usr/bin:/bin"
    assert set(env) <= {"PATH", "LANG", "HOME", "TMPDIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                        "MKL_NUM_THREADS", "LC_CTYPE"}


def test_workdir_is_removed_even_when_made_hard_to_remove(isolate):
    code = ("import os\nprint(os.getcwd())\nos.makedirs('a/b/c')\nopen('a/b/c/f', 'w').write('x')\n"
            "os.chmod('a/b', 0)\nos.chmod('a', 0o500)\n")
    result = run_python(code, limits=FAST, isolate=isolate)
    assert result.ok, result
    _assert_all_gone(result)


def test_pool_keeps_order(isolate):
    jobs = [SandboxJob(f"import time\ntime.sleep({(5 - i) * 0.05})\nprint({i})") for i in range(6)]
    jobs += ["print('plain')", ("print(input()[::-1])", "abc\n")]
    with SandboxPool(workers=3, limits=FAST, isolate=isolate) as pool:
        results = pool.map(jobs)
    assert [r.stdout.strip() for r in results] == ["0", "1", "2", "3", "4", "5", "plain", "cba"]
    assert all(r.ok for r in results)


def test_isolation_choice():
    available, _ = sandbox.namespace_support()
    pid = run_python("import os; print(os.getpid())", limits=FAST, isolate="auto").stdout.strip()
    assert (pid == "2") == available  # pid 2 of its own pid namespace, or an ordinary pid
    with pytest.raises(ValueError):
        run_python("pass", isolate="docker")
    if not available:
        with pytest.raises(RuntimeError):
            run_python("pass", isolate="namespaces")


def test_auto_falls_back_when_namespaces_fail(monkeypatch):
    """A launcher that cannot set up (as in a container without user namespaces): 'auto' runs unisolated."""
    failing = "import os, sys\nos.write(int(sys.argv[1]), b'error unshare: Operation not permitted\\n')\nos._exit(125)\n"
    monkeypatch.setattr(sandbox, "_LAUNCHER", failing)
    monkeypatch.setattr(sandbox, "_probe", None)
    assert sandbox.namespace_support() == (False, "sandbox setup failed: unshare: Operation not permitted")
    result = run_python("import os; print(os.getpid())", limits=FAST, isolate="auto")
    assert result.ok and result.stdout.strip() != "2"
    with pytest.raises(RuntimeError, match="not available"):
        run_python("pass", isolate="namespaces")
