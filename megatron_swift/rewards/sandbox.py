"""Run untrusted Python code (a model's completion) in a box: bubblewrap for isolation, a cgroup (or
rlimits) for the limits of the whole job.

``SandboxPool(workers, limits, isolation).run(code, stdin)`` runs one program; ``run_linked`` runs two
boxes joined by a pipe pair (the code-execution reward's harness and the solution, ``rewards/code.py``).
Whatever the code does, a run returns a ``SandboxResult`` and, when it returns, every process the job
started is gone.

* Isolation (``rewards/isolator.py``): ``isolation="bwrap"`` (the default) or ``"none"``, an explicit
  opt-out for code you trust (a plain child process in a temporary folder, logged as a warning). If
  bubblewrap is missing or cannot start, ``SandboxUnavailable`` says how to install it; a run never falls
  back to less isolation on its own.
* Limits (``SandboxLimits``) hold for the whole job where a cgroup can be made (``rewards/job_limits.py``:
  pids, memory including the files of its working directory, CPU time polled), else per process
  (rlimits, with a uid per box when the trainer is root). Always also per process: RLIMIT_CPU, RLIMIT_AS,
  RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE, no core files; the working directory is a tmpfs of
  ``max_disk_mb``; wall time and output size are kept by the trainer (a box writing more than
  ``max_output_bytes`` is killed at once, so the trainer never holds more than that).
* ``describe(isolation)`` is the line that says which isolation and which limits a run gets.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from megatron_swift.rewards import job_limits
from megatron_swift.rewards.isolator import INSTALL_HINT, Box, Bubblewrap, UidPool, find_bubblewrap, interpreter

log = logging.getLogger(__name__)

TRUNCATION_MARKER = "\n...[output truncated by the sandbox]"
ISOLATIONS = ("bwrap", "none")
MAIN_FILE = "main.py"
DEFAULT_UID_BASE = 61000
# After the main program exits, how long what it left behind may keep its pipes open.
_EXIT_GRACE_S = 0.5
_INFO_CAP = 4096


class SandboxUnavailable(RuntimeError):
    """The isolator is missing or cannot start here; the message says how to fix it."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one job. Frozen, so a shared default instance cannot be changed by accident."""

    cpu_seconds: int = 5
    """CPU time: of the whole job with a cgroup, else of each process (RLIMIT_CPU) ."""
    wall_seconds: float = 10
    """Wall-clock time; then every process of the job is killed."""
    memory_mb: int = 512
    """Memory: of the whole job with a cgroup (plus its files), else each process's address space."""
    max_processes: int = 8
    """Processes and threads of the job (a box's own uid or its cgroup)."""
    max_file_mb: int = 16
    """Largest file the job may write (RLIMIT_FSIZE)."""
    max_disk_mb: int = 32
    """Size of the working directory (a tmpfs): all the files the job writes together."""
    max_open_files: int = 64
    """Open files of each process (RLIMIT_NOFILE; with max_processes, a bound for the job)."""
    max_output_bytes: int = 65536
    """Bytes of stdout and of stderr kept; a job that writes more is killed."""


class SandboxJob(NamedTuple):
    code: str
    stdin: str = ""


class SandboxResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    reason: str
    """Why the run ended early: "" (it finished), "wall time", "cpu time", "memory", "killed",
    "output truncated", "signal NAME", or "sandbox error: ..." when it could not run at all."""
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.reason


# ------------------------------------------------------------------------------------ the isolator

_probe_lock = threading.Lock()
_probes: Dict[str, Tuple[Optional[Bubblewrap], str]] = {}


def isolation_problem(isolation: str) -> Optional[str]:
    """None when ``isolation`` can run here, else one line saying why not and what to do."""
    if isolation not in ISOLATIONS:
        return f"isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}"
    if isolation == "none":
        return None
    _isolator, why = _isolator_for(isolation)
    return f"the code sandbox cannot start: {why}; {INSTALL_HINT}" if why else None


def describe(isolation: str) -> str:
    """The line a run logs first: its isolation and how its limits are kept."""
    limits = job_limits.detect().description
    if isolation == "none":
        return (f"code sandbox: NOT ISOLATED (task.sandbox.isolation=none): completions' code runs with the trainer's "
                f"user, files and network; use it only for code you trust; {limits}")
    isolator, _ = _isolator_for(isolation)
    who = "a uid of its own per box" if isolator is not None and isolator.root else "the trainer's uid in a user namespace"
    return f"code sandbox: bubblewrap ({who}, no network, read-only runtime, private /tmp); {limits}"


def _isolator_for(isolation: str) -> Tuple[Optional[Bubblewrap], str]:
    """The isolator and "" once a probe box ran here, else (None, why); cached per process."""
    with _probe_lock:
        if isolation not in _probes:
            isolator, why = find_bubblewrap()
            if isolator is not None:
                why = _probe(isolator)
            _probes[isolation] = (isolator if not why else None, why)
        return _probes[isolation]


def _probe(isolator: Bubblewrap) -> str:
    runner = _Runner(isolator, SandboxLimits(cpu_seconds=5, wall_seconds=20), DEFAULT_UID_BASE)
    result = runner.run("import os\nprint('ok', os.getpid())", "")
    if result.stdout.split() == ["ok", "2"] and result.ok:
        return ""
    detail = " ".join((result.reason + " " + result.stderr).split())[-300:]
    return f"bubblewrap did not start a box ({detail or 'returncode %d' % result.returncode})"


# --------------------------------------------------------------------------------------- running

_uid_pools: Dict[int, UidPool] = {}
_uid_lock = threading.Lock()


def _uid_pool(base: int) -> UidPool:
    with _uid_lock:
        return _uid_pools.setdefault(base, UidPool(base))


@dataclass
class _Started:
    """A spawned box: its process, the streams read from it and what must be undone after it."""

    proc: Optional[subprocess.Popen]
    box: Optional[Box]
    workdir: Optional[str]
    info_fd: Optional[int]
    isolated: bool = True


class _Runner:
    """Runs jobs of one isolation and limits (thread-safe: every job has its own boxes)."""

    def __init__(self, isolator: Optional[Bubblewrap], limits: SandboxLimits, uid_base: int):
        self.isolator, self.limits = isolator, limits
        self.uids = _uid_pool(uid_base) if isolator is not None and isolator.root else None
        self.job_limits = job_limits.detect()

    def run(self, code: str, stdin: str) -> SandboxResult:
        return self.run_boxes([({MAIN_FILE: code.encode()}, [MAIN_FILE], stdin, ())])[0]

    def run_boxes(self, specs: Sequence[Tuple[Dict[str, bytes], List[str], str, Tuple[int, ...]]]
                  ) -> List[SandboxResult]:
        """Run boxes (files, python args, stdin, fds to inherit) together; the FIRST decides when the job
        ends (the others are killed when it does). One result per box."""
        inherited = {fd for spec in specs for fd in spec[3]}
        started: List[_Started] = []
        start = time.monotonic()
        cgroup = None
        try:
            cgroup = self.job_limits.create(self.limits, boxes=len(specs))
            for files, args, stdin, fds in specs:
                started.append(self._spawn(files, args, stdin, fds, cgroup))
            _close(inherited)  # the boxes hold them now: EOF comes when a box is gone
            inherited = set()
            return _watch_and_end(started, self.limits, cgroup, start)
        except OSError as e:
            for s in started:
                _end(s, cgroup)
            return [SandboxResult(-1, "", "", False, f"sandbox error: {e}", time.monotonic() - start)] * len(specs)
        finally:
            _close(inherited)
            for s in started:
                self._release(s)
            if cgroup is not None:
                cgroup.remove()

    def _spawn(self, files, args, stdin: str, fds, cgroup) -> _Started:
        box = Box(files, list(args), tuple(fds))
        workdir = info_r = info_w = None
        try:
            if self.isolator is not None:
                box.uid = self.uids.take() if self.uids is not None else None
                info_r, info_w = os.pipe()
                argv = self.isolator.argv(box, self.limits.max_disk_mb)
                argv[1:1] = ["--info-fd", str(info_w)]
                cwd, pass_fds = "/", (*box._fds, *fds, info_w)
            else:
                workdir = tempfile.mkdtemp(prefix="msw-sandbox-")
                for name, data in files.items():
                    with open(os.path.join(workdir, name), "wb") as f:
                        f.write(data)
                argv, cwd, pass_fds = [interpreter(), "-I", "-S", *args], workdir, tuple(fds)
            argv = job_limits.join_argv(cgroup) + _prlimit_argv(self.limits) + argv
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir or "/", "TMPDIR": workdir or "/tmp"}
            stdin_fd = _sealed_input(stdin.encode("utf-8"))
            try:
                proc = subprocess.Popen(argv, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        cwd=cwd, env=env, start_new_session=True, close_fds=True, pass_fds=pass_fds)
            finally:
                os.close(stdin_fd)
        except BaseException:  # nothing started: give back the uid, the fds and the folder
            _close([fd for fd in (info_r, info_w) if fd is not None])
            self._release(_Started(None, box, workdir, None))
            raise
        _close([info_w] if info_w is not None else [])
        box.close()
        return _Started(proc, box, workdir, info_r, isolated=self.isolator is not None)

    def _release(self, started: _Started) -> None:
        if started.box is not None:
            started.box.close()
            if self.uids is not None:
                self.uids.give(started.box.uid)
                started.box.uid = None
        if started.workdir is not None:
            _remove_tree(started.workdir)
            started.workdir = None


def _sealed_input(data: bytes) -> int:
    """A read-only fd holding ``data``, in memory and sealed: a file on the host's disk as stdin would let
    the code write there or reserve blocks with fallocate (neither RLIMIT_FSIZE nor the cgroup counts
    those); a pipe would need a writer thread for large inputs."""
    fd = os.memfd_create("stdin", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_SEAL)
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def _prlimit_argv(limits: SandboxLimits) -> List[str]:
    mib = 1024 * 1024
    cpu = max(1, int(limits.cpu_seconds))
    # the soft CPU limit sends SIGXCPU, the hard one (a second later) SIGKILL for code that ignores it
    return ["prlimit", "--core=0", f"--cpu={cpu}:{cpu + 1}", f"--as={int(limits.memory_mb) * mib}",
            f"--nproc={int(limits.max_processes)}", f"--fsize={int(limits.max_file_mb) * mib}",
            f"--nofile={int(limits.max_open_files)}", "--"]


# ------------------------------------------------------------------------------ watching a job

class _Output:
    """Reads every box's pipes without ever holding more than cap + one chunk per stream."""

    CHUNK = 65536

    def __init__(self, caps: Dict[tuple, int]):
        self.selector = selectors.DefaultSelector()
        self.data = {key: bytearray() for key in caps}
        self.caps = caps
        self.overflow = False

    def add(self, key: tuple, fd: int) -> None:
        os.set_blocking(fd, False)
        self.selector.register(fd, selectors.EVENT_READ, key)

    def open(self, index: int) -> bool:
        return any(key.data[0] == index for key in self.selector.get_map().values())

    def read(self, timeout: float) -> None:
        for key, _ in self.selector.select(max(0.0, timeout)):
            try:
                chunk = os.read(key.fd, self.CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                self.selector.unregister(key.fd)
                continue
            buf = self.data[key.data]
            buf += chunk[: self.caps[key.data] + 1 - len(buf)]
            if len(buf) > self.caps[key.data] and key.data[1] != "info":
                self.overflow = True

    def close(self) -> None:
        self.selector.close()


def _watch_and_end(started: List[_Started], limits: SandboxLimits, cgroup, start: float) -> List[SandboxResult]:
    caps = {}
    for i, s in enumerate(started):
        caps[(i, "stdout")] = caps[(i, "stderr")] = limits.max_output_bytes
        if s.info_fd is not None:
            caps[(i, "info")] = _INFO_CAP
    output = _Output(caps)
    for i, s in enumerate(started):
        output.add((i, "stdout"), s.proc.stdout.fileno())
        output.add((i, "stderr"), s.proc.stderr.fileno())
        if s.info_fd is not None:
            output.add((i, "info"), s.info_fd)
    try:
        ended_by = _watch(started[0].proc, output, start + limits.wall_seconds, cgroup, limits.cpu_seconds)
    finally:
        for i, s in enumerate(started):
            _end(s, cgroup, _child_pid(output.data.get((i, "info"))))
        if cgroup is not None:
            _wait_empty(cgroup)
        output.close()
    duration = time.monotonic() - start
    oom = cgroup is not None and cgroup.oom_killed()
    results = []
    for i, s in enumerate(started):
        stderr = _decode(output.data[(i, "stderr")], limits.max_output_bytes)
        returncode = _returncode(s)
        reason, timed_out = _reason(returncode, stderr, ended_by, oom)
        results.append(SandboxResult(returncode, _decode(output.data[(i, "stdout")], limits.max_output_bytes),
                                     stderr, timed_out, reason, duration))
    return results


def _watch(proc: subprocess.Popen, output: _Output, deadline: float, cgroup, cpu_seconds: float) -> str:
    """Read output until the main box ends; return "wall time", "cpu time", "output truncated" or ""."""
    exited_at = None
    while output.open(0):
        now = time.monotonic()
        if now >= deadline:
            return "wall time"
        if exited_at is None and _has_exited(proc.pid):
            exited_at = now
        if exited_at is not None and now - exited_at > _EXIT_GRACE_S:
            return ""
        output.read(min(deadline - now, 0.05))
        if output.overflow:
            return "output truncated"
        used = cgroup.cpu_seconds() if cgroup is not None else None
        if used is not None and used > cpu_seconds:
            return "cpu time"
    while not _has_exited(proc.pid):  # pipes closed, process still finishing
        if time.monotonic() >= deadline:
            return "wall time"
        time.sleep(0.002)
    return ""


def _child_pid(info: Optional[bytearray]) -> Optional[int]:
    """The host pid of the box's init (bubblewrap's --info-fd), whose end ends every process in the box."""
    if not info:
        return None
    try:
        return int(json.JSONDecoder().raw_decode(bytes(info).decode().lstrip())[0]["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _end(started: _Started, cgroup, child_pid: Optional[int] = None) -> None:
    """Kill what is left of a box and wait for it. With bubblewrap, killing the box's init makes the
    kernel kill everything in its pid namespace, and bubblewrap's monitor (our child) exits only after
    that: once ``proc.wait`` returns, nothing of the box runs. (The job's cgroup, if any, is emptied
    after this, as a second net.)"""
    proc = started.proc
    if proc is None:
        return
    if not _has_exited(proc.pid):
        if child_pid is not None:
            _kill(child_pid)  # not bubblewrap's monitor: it must live to reap the init, and so tell us
        else:
            _kill_tree(proc.pid)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.wait()
    if started.workdir is not None:  # no pid namespace: what the code left behind is hunted down
        _kill_tree(proc.pid)
    proc.stdout.close()
    proc.stderr.close()
    if started.info_fd is not None:
        os.close(started.info_fd)
        started.info_fd = None


def _wait_empty(cgroup, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while cgroup.pids() and time.monotonic() < deadline:
        cgroup.kill()
        time.sleep(0.005)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tree(pid: int) -> None:
    """SIGKILL a process group and every descendant that left it (isolation=none), then wait for them."""
    try:
        import psutil
        tree = psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing, or the process already gone
        tree = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in tree:
        try:
            proc.kill()
        except Exception:
            pass
    deadline = time.monotonic() + 5
    while any(_running(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.005)


def _running(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != "zombie"
    except Exception:
        return False


def _has_exited(pid: int) -> bool:
    """Whether the child is dead, WITHOUT reaping it (its pid stays reserved until we wait for it)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _returncode(started: _Started) -> int:
    rc = started.proc.returncode
    if started.isolated and rc is not None and rc > 128:
        return -(rc - 128)  # bubblewrap exits 128 + N when its program was killed by signal N
    return rc


def _decode(data: bytearray, cap: int) -> str:
    text = bytes(data[:cap]).decode("utf-8", errors="replace")
    return text + TRUNCATION_MARKER if len(data) > cap else text


def _reason(returncode: int, stderr: str, ended_by: str, oom: bool) -> Tuple[str, bool]:
    """(reason, timed_out) from how the run ended."""
    if ended_by:
        return ended_by, ended_by in ("wall time", "cpu time")
    if oom:
        return "memory", False
    if returncode == -signal.SIGXCPU:
        return "cpu time", True
    if returncode == -signal.SIGKILL:
        return "killed", False
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}", False
        except ValueError:
            return f"signal {-returncode}", False
    if returncode != 0 and "MemoryError" in stderr[-2000:]:
        return "memory", False
    return "", False


def _remove_tree(path: str) -> None:
    """rmtree that copes with folders the code made unreadable (isolation=none only: with bubblewrap the
    working directory is a tmpfs that goes with the box)."""
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            sub = os.path.join(root, name)
            if not os.path.islink(sub):
                try:
                    os.chmod(sub, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ public API

JobLike = Union[SandboxJob, str, Tuple[str, str]]


class SandboxPool:
    """Runs jobs on ``workers`` threads, each job in boxes of its own. Raises ``SandboxUnavailable`` at
    construction when ``isolation="bwrap"`` cannot run here. Use as a context manager or call ``close``."""

    def __init__(self, workers: int = 4, limits: SandboxLimits = SandboxLimits(), isolation: str = "bwrap",
                 uid_base: int = DEFAULT_UID_BASE):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        problem = isolation_problem(isolation)
        if problem:
            raise SandboxUnavailable(problem)
        self.limits, self.isolation = limits, isolation
        self._runner = _Runner(_isolator_for(isolation)[0] if isolation != "none" else None, limits, uid_base)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")

    def run(self, code: str, stdin: str = "") -> SandboxResult:
        """One job, in the calling thread."""
        return self._runner.run(code, stdin)

    def run_linked(self, main: Tuple[Dict[str, bytes], List[str], str], peer: Tuple[Dict[str, bytes], List[str], str]
                   ) -> Tuple[SandboxResult, SandboxResult]:
        """Two boxes joined by two pipes: ``main`` (files, python args, stdin) decides when the job ends.
        The args may use ``{read}`` and ``{write}``: each box's ends (main writes what peer reads)."""
        to_peer_r, to_peer_w = os.pipe()
        to_main_r, to_main_w = os.pipe()
        specs = []
        for (files, args, stdin), (r, w) in ((main, (to_main_r, to_peer_w)), (peer, (to_peer_r, to_main_w))):
            specs.append((files, [a.format(read=r, write=w) for a in args], stdin, (r, w)))
        main_result, peer_result = self._runner.run_boxes(specs)
        return main_result, peer_result

    def map(self, jobs: Iterable[JobLike]) -> List[SandboxResult]:
        """Results in job order; never raises for a job (infrastructure trouble is a "sandbox error")."""
        return list(self._executor.map(self._run_safely, [_as_job(job) for job in jobs]))

    def submit(self, fn, *args):
        """Run ``fn(self, *args)`` on a worker thread (code.py's linked jobs)."""
        return self._executor.submit(fn, self, *args)

    def _run_safely(self, job: SandboxJob) -> SandboxResult:
        try:
            return self.run(job.code, job.stdin)
        except Exception as e:
            return SandboxResult(-1, "", "", False, f"sandbox error: {type(e).__name__}: {e}", 0.0)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_python(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), isolation: str = "bwrap",
               ) -> SandboxResult:
    """Run ``code`` with ``stdin`` in a fresh box and report what happened (see the module docstring)."""
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise TypeError("code and stdin must be str")
    with SandboxPool(1, limits, isolation) as pool:
        return pool.run(code, stdin)


def _as_job(job: JobLike) -> SandboxJob:
    if isinstance(job, SandboxJob):
        return job
    if isinstance(job, str):
        return SandboxJob(job)
    if isinstance(job, Sequence) and len(job) == 2:
        return SandboxJob(str(job[0]), str(job[1]))
    raise TypeError(f"a sandbox job is code, (code, stdin) or a SandboxJob; got {type(job).__name__}")
