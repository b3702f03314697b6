"""Run untrusted Python code (a model's completion) in a separate, limited process.

``run_python(code, stdin, limits, isolate)`` writes the code to a fresh, empty
temporary directory, runs it there with ``python -I`` and returns a
``SandboxResult``; the directory is removed afterwards, whatever happened.
``SandboxPool`` runs many such jobs from a few threads (the isolation is the
per-run process, the threads only wait on it).

What every run gets, in both modes
----------------------------------
* its own process, session and process group (``start_new_session``), in the
  temporary directory, with an environment of PATH=/usr/bin:/bin, LANG, HOME and
  TMPDIR (= the directory) and single-thread settings for BLAS/OpenMP: nothing
  of the trainer's environment (no WANDB_API_KEY, HF_TOKEN, ...);
* resource limits set by the child on itself before the code runs:
  RLIMIT_CPU (SIGXCPU at ``cpu_seconds``, SIGKILL one second later),
  RLIMIT_AS (``memory_mb``: allocations fail with MemoryError), RLIMIT_NPROC
  (``max_processes``; the kernel does not apply it to root, and counts every
  process and thread of the user, so outside a namespace a non-root trainer's
  own threads count too), RLIMIT_FSIZE (``max_file_mb``) and RLIMIT_CORE=0;
* a wall-clock limit kept by the trainer: at ``wall_seconds`` the whole process
  group (and, with namespaces, the whole pid namespace) is killed with SIGKILL;
* bounded output: at most ``max_output_bytes`` of stdout and of stderr are kept;
  a child that writes more is killed at once (reason "output truncated"), so a
  ``while True: print("x" * 10**6)`` costs the trainer ~64 KiB of memory, not GBs;
* an audit hook (``sys.addaudithook``), installed by a bootstrap passed with
  ``-c`` before the code is compiled (nothing in the working directory), that
  refuses with PermissionError (ImportError for imports, which libraries such as
  numpy treat as "optional module missing"):
  - creating processes at all: ``os.fork``/``forkpty``/``system``/``exec*``/
    ``posix_spawn``, ``subprocess.Popen`` (so ``multiprocessing`` too), and
    ``_posixsubprocess.fork_exec``, which raises no audit event of its own, so
    the bootstrap replaces it. Refused entirely rather than counted up to
    ``max_processes``: a count kept in the hook would be per process, and test
    solutions do not need children;
  - writing, creating, removing, renaming, linking, chmod/chown/utime/truncate
    anything outside the working directory (harmless devices excepted; symlinks
    and ``/proc/self/fd`` links are followed), ``shutil.rmtree`` outside,
    ``os.chdir`` out of it, opening device nodes other than /dev/null, zero,
    full, random, urandom, ``mknod``/``mkfifo`` (no audit event: replaced,
    although a fresh ``posix`` module from ``_imp`` has them back, hence the
    device rule), writing to fifos, symlinks with absolute or ``..`` targets,
    opening directories outside, and relative paths with ``..`` in ``open``
    (the event does not carry ``dir_fd``; these two rules keep ``dir_fd=``
    calls inside);
  - sockets other than AF_UNIX, every ``connect``/``bind``/``sendto``/``sendmsg``
    and DNS look-ups;
  - importing ``ctypes``/``cffi`` (a ctypes pointer can overwrite the hook),
    ``posix``/``_posixsubprocess`` again (a fresh copy would bring back the replaced
    functions), subinterpreter and ``_test*`` modules; loading extension modules
    from outside the interpreter's own ``sys.path`` (a ``.so`` written to the
    working directory); ``ctypes.*`` events; ``gc.get_objects``/``get_referrers``/
    ``get_referents`` (they reach the hook); new subinterpreters (they start
    without the hook); ``resource.setrlimit``/``prlimit``; ``os.kill`` of any
    process but itself and ``os.killpg``.
  The hook is a closure over C functions and constants only, and turns every
  argument into an exact ``str`` first, so patching ``os``, ``os.path`` or
  ``builtins``, or passing a ``str`` subclass, does not change what it checks.
  ``code.__new__`` (``CodeType.replace``) stays allowed: ``asyncio`` needs it.

``isolate="none"``: only the above
----------------------------------
The audit hook guards against Python-level misbehaviour (an accidental
``rm -rf``, a fork loop, a network call, a model "fixing" its tests), it is NOT
a security boundary: code that gets native code running (hand-made bytecode
through ``code.__new__`` or ``marshal``, an extension module loaded from a
memfd, an interpreter bug) or that races the hook (a path-like object whose
``__fspath__`` answers differently the second time) is past it, and then has
the trainer's user, network and filesystem rights. Processes created that way
are killed with the process group and psutil's view of the run's descendants,
but a double-forked ``setsid`` daemon can escape.

``isolate="namespaces"``: the kernel is the boundary
----------------------------------------------------
A small launcher (``python -I -c``) calls ``unshare(2)`` through ctypes for new
user, mount, network, IPC and pid namespaces (the trainer's uid becomes uid 0
inside), forks the namespace's init (pid 1), which forks and execs the code's
interpreter (pid 2). Before that, init:
* makes every mount read-only (``mount_setattr``, recursive from ``/``: /tmp and
  /dev/shm included) except a bind mount of the working directory (nosuid,
  nodev, noexec: a ``.so`` written there cannot be mapped executable), and
  mounts a fresh /proc that shows only the namespace's processes;
* drops every capability (bounding set, ambient set, securebits NOROOT and
  no_new_privs), so the code cannot remount anything writable.
Then, even for native code: no network at all (a new network namespace with
no interface up, not even loopback); no writes outside the working directory
(EROFS); only its own processes are visible and can be signalled, and all of
them die with init, which exits as soon as the code's main process does (or is
killed at wall time): no descendant survives a run. What it still can: read
what the trainer's user can read; use CPU and memory up to the limits; and, as
the kernel does not apply RLIMIT_NPROC to root, a root trainer's sandbox can
fork until wall time: the pid namespace bounds the lifetime of those processes,
not their number (the audit hook refuses fork at the Python level; a cgroup
``pids.max`` would be the kernel answer, it is not set up here). The working
directory's total size is not limited, only each file's (RLIMIT_FSIZE).

``isolate="auto"`` uses namespaces when the kernel allows them (tested once per
process with a real run, see ``namespaces_available``), else "none".
Namespace mode needs Linux >= 5.12 (``mount_setattr``) and unprivileged (or
root) user namespaces; containers often forbid them, then "auto" falls back.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

log = logging.getLogger(__name__)

TRUNCATION_MARKER = "\n...[output truncated by the sandbox]"
ISOLATION_MODES = ("auto", "namespaces", "none")
# The code file inside the working directory (tracebacks show this name).
MAIN_FILE = "main.py"
# Setup failures of the namespace launcher exit with this status (and say why on the report pipe).
_SETUP_FAILED = 125
# After the main process exits, how long descendants may keep its pipes open before being killed.
_EXIT_GRACE_S = 0.5
_REPORT_CAP = 4096


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. Frozen, so a shared default instance cannot be changed by accident."""

    cpu_seconds: int = 5
    """CPU time (RLIMIT_CPU): SIGXCPU at this many seconds, SIGKILL one second later."""
    wall_seconds: float = 10
    """Wall-clock time from start to kill (SIGKILL to the process group / pid namespace)."""
    memory_mb: int = 512
    """Address space (RLIMIT_AS) of the code's interpreter, in MiB; allocations beyond fail with MemoryError."""
    max_processes: int = 8
    """RLIMIT_NPROC (processes and threads of the user; not applied by the kernel to root)."""
    max_file_mb: int = 16
    """Largest file the code may write (RLIMIT_FSIZE), in MiB."""
    max_output_bytes: int = 65536
    """Bytes kept of stdout and of stderr each; writing more kills the run (reason "output truncated")."""


@dataclass
class SandboxResult:
    """What a run did. ``returncode`` is negative (-signal) when the code was killed by a signal."""

    returncode: int
    """Exit status of the code (-N: killed by signal N; -1: it never ran, see ``reason``)."""
    stdout: str
    """Standard output (UTF-8, invalid bytes replaced), cut at ``max_output_bytes`` plus a marker."""
    stderr: str
    """Standard error, same rules as stdout."""
    timed_out: bool
    """True when the wall-time or the CPU-time limit ended the run."""
    reason: str
    """Why the run ended abnormally: "" (it exited by itself), "wall time", "cpu time", "memory",
    "output truncated", "killed", "signal SIGSEGV", "spawn failed: ...", "sandbox setup failed: ..."."""
    duration: float
    """Seconds from start to the end of the run."""

    @property
    def ok(self) -> bool:
        """Exited by itself with status 0, nothing cut off."""
        return self.returncode == 0 and not self.timed_out and not self.reason


class SandboxJob(NamedTuple):
    """One ``SandboxPool`` job: code and its standard input."""

    code: str
    stdin: str = ""


# ------------------------------------------------------------------------------------------ child side
# The bootstrap runs as `python -I -c _BOOTSTRAP <config json>` in the working directory. It must not
# print anything, and it leaves __main__ as clean as a script's namespace before exec'ing the code there.
_BOOTSTRAP = r'''
def _sandbox_start():
    import json, os, resource, sys
    cfg = json.loads(sys.argv[1])
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    work = os.path.realpath(cfg["workdir"])
    if cfg["audit"]:
        _guard(work)
    path = os.path.join(work, cfg["main"])
    with open(path, "rb") as f:
        source = f.read()
    sys.argv = [path]
    main = sys.modules["__main__"].__dict__
    del main["_sandbox_start"], main["_guard"], main["_make_hook"]
    main["__file__"] = path
    return compile(source, path, "exec")


def _guard(work):
    import os, posix, sys
    # subprocess and multiprocessing create processes through this C function, which raises no audit
    # event; replace it before any code can hold a reference to it (re-imports are refused by the hook).
    import _posixsubprocess
    def fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: creating processes is not allowed")
    _posixsubprocess.fork_exec = fork_exec
    # mknod/mkfifo raise no audit event either (device nodes, files outside the directory); a fresh
    # copy of posix would bring them back, so re-importing posix is refused too.
    def mknod(*args, **kwargs):
        raise PermissionError("sandbox: mknod/mkfifo is not allowed")
    posix.mknod = posix.mkfifo = os.mknod = os.mkfifo = mknod
    # extension modules may come from the interpreter's own directories only (never from one that
    # holds the working directory)
    trusted = tuple(d for d in (os.path.realpath(p) + "/" for p in sys.path if p.startswith("/") and os.path.isdir(p))
                    if not (work + "/").startswith(d))
    sys.addaudithook(_make_hook(work, trusted))


def _make_hook(work, trusted):
    # Everything the hook uses is bound here, from C modules (posix, not os/os.path: the code can patch
    # those and the builtins). Arguments are turned into exact str before use, so a str subclass with
    # its own startswith/__eq__ cannot answer for them.
    import posix, stat, socket
    stat_, readlink, getcwd, getpid, fspath = posix.stat, posix.readlink, posix.getcwd, posix.getpid, posix.fspath
    Denied, OSError_, ImportError_, ValueError_ = PermissionError, OSError, ImportError, ValueError
    str_, bytes_, int_, type_, len_, isinstance_ = str, bytes, int, type, len, isinstance
    concat = str.__add__
    S_IFMT, S_IFREG, S_IFDIR, S_IFCHR, S_IFBLK = 0o170000, stat.S_IFREG, stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK
    harmless_devices = frozenset({"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"})
    AF_UNIX = int(socket.AF_UNIX)
    WRITE_FLAGS = posix.O_WRONLY | posix.O_RDWR | posix.O_APPEND | posix.O_CREAT | posix.O_TRUNC
    work_prefix = work + "/"
    processes = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.posix_spawnp",
                           "os.spawn", "subprocess.Popen", "os.startfile", "pty.spawn"})
    refused = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents",
                         "cpython.PyInterpreterState_New", "resource.setrlimit", "resource.prlimit", "os.killpg",
                         "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                         "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo"})
    # posix and _posixsubprocess are loaded and patched already: importing them again means a fresh copy
    blocked_modules = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "posix",
                                 "_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels"})
    # event -> ((index of a path it modifies, index of its dir_fd or -1), ...): those paths must be inside
    modifies = {
        "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.chflags": ((0, -1),), "os.lchflags": ((0, -1),),
        "os.link": ((0, 2), (1, 3)), "os.mkdir": ((0, 2),), "os.remove": ((0, 1),), "os.rmdir": ((0, 1),),
        "os.rename": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.truncate": ((0, -1),),
        "os.utime": ((0, 3),), "os.setxattr": ((0, -1),), "os.removexattr": ((0, -1),),
        "shutil.rmtree": ((0, 1),), "os.chdir": ((0, -1),),
    }

    def deny(what):
        raise Denied("sandbox: " + what + " is not allowed")

    def arg(args, index):
        return args[index] if 0 <= index < len_(args) else None

    def text(path):
        """An exact str for a str, bytes or path-like argument."""
        if type_(path) is int_:
            return path
        if not (type_(path) is str_ or type_(path) is bytes_ or isinstance_(path, (str_, bytes_))):
            path = fspath(path)
        if isinstance_(path, bytes_):
            path = bytes_.decode(path, "utf-8", "surrogateescape")
        return concat("", path)

    def resolve(path, dir_fd=None):
        """Absolute path with symlinks followed (like realpath, but built from C calls only)."""
        path = text(path)
        if type_(path) is int_:  # a file descriptor: ask the kernel what it refers to
            return readlink("/proc/self/fd/" + str_(path))
        if not path.startswith("/"):
            base = getcwd() if dir_fd is None else readlink("/proc/self/fd/" + str_(dir_fd))
            path = base + "/" + path
        done, todo, hops = [], path.split("/")[::-1], 0
        while todo:
            part = todo.pop()
            if part == "" or part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = "/" + "/".join(done + [part])
            try:
                target = readlink(candidate)
            except OSError_:  # not a symlink, or does not exist (yet)
                done.append(part)
                continue
            hops += 1
            if hops > 40:
                deny("a symlink loop")
            if target.startswith("/"):
                done = []
            todo.extend(target.split("/")[::-1])
        return "/" + "/".join(done)

    def inside(path, dir_fd=None):
        if dir_fd is not None and (type_(dir_fd) is not int_ or dir_fd < 0):
            dir_fd = None  # -1 / -100 (AT_FDCWD): relative to the working directory
        try:
            real = resolve(path, dir_fd)
        except OSError_:
            return False
        return real == work or real.startswith(work_prefix)

    def file_kind(path):
        try:
            return S_IFMT & stat_(path).st_mode
        except (OSError_, ValueError_):  # ValueError: an embedded NUL
            return None  # does not exist (yet)

    def check_open(args):
        path, mode, flags = arg(args, 0), arg(args, 1), arg(args, 2)
        if type_(path) is int_:  # through an existing descriptor: its own opening was checked
            return
        path = text(path)
        if not path.startswith("/") and ".." in path.split("/"):
            # the event does not say which dir_fd a relative path is opened from; without '..' it can
            # only go down from a directory inside (directories outside cannot be opened)
            deny("opening a relative path with '..'")
        writing = (type_(flags) is int_ and flags & WRITE_FLAGS) or (
            type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
        kind = file_kind(path)
        if kind == S_IFCHR or kind == S_IFBLK:
            # a raw disk node (mknod can be had back through a fresh posix module) is no business of the code
            if resolve(path) not in harmless_devices:
                deny("opening device files")
        elif writing:
            if path == "/dev/stdout" or path == "/dev/stderr":
                return
            if not inside(path):
                deny("writing outside the working directory")
            if kind is not None and kind != S_IFREG and kind != S_IFDIR:
                deny("writing to a fifo or socket")
        elif kind == S_IFDIR and not inside(path):
            deny("opening a directory outside the working directory")  # its fd would let dir_fd= calls out

    def check_import(args):
        # ImportError, not PermissionError: libraries treat ctypes as optional (numpy does)
        name = concat("", arg(args, 0))
        if name in blocked_modules or name.split(".")[0] in blocked_modules or name.startswith("_test"):
            raise ImportError_("sandbox: importing " + name + " is not allowed")
        filename = arg(args, 1)
        if filename is not None:  # an extension module being loaded: only from the interpreter's own paths
            real = resolve(filename)
            for prefix in trusted:
                if real.startswith(prefix):
                    return
            raise ImportError_("sandbox: loading native code from " + real + " is not allowed")

    def check_paths(event, args):
        for index, fd_index in modifies[event]:
            if not inside(arg(args, index), arg(args, fd_index)):
                deny(event + " outside the working directory")
        if event == "os.symlink":
            target = text(arg(args, 0))
            if type_(target) is int_ or target.startswith("/") or ".." in target.split("/"):
                deny("a symlink with an absolute or '..' target")

    def hook(event, args):
        if event == "open":
            check_open(args)
        elif event == "import":
            check_import(args)
        elif event in modifies:
            check_paths(event, args)
        elif event in processes:
            deny("creating processes")
        elif event in refused or event.startswith("ctypes."):
            deny(event)
        elif event == "socket.__new__":
            if arg(args, 1) != AF_UNIX:
                deny("network sockets")
        elif event == "os.kill":
            if arg(args, 0) != getpid():
                deny("signalling other processes")

    return hook


exec(_sandbox_start())
'''

# The namespace launcher: `python -I -c _LAUNCHER <report fd> <workdir> <json argv of the code's interpreter>`.
# It reports "status <wait status>" or "error <text>" on the report pipe (stdout/stderr belong to the code).
_LAUNCHER = r'''
import ctypes, json, os, sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 0x4000, 1 << 18
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000  # 442 on every architecture (new syscall table)
ATTR_RDONLY, ATTR_NOSUID, ATTR_NODEV, ATTR_NOEXEC = 1, 2, 4, 8
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 28, 38, 47
SECUREBITS_LOCKED_NOROOT = 0xEF  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS off, NO_CAP_AMBIENT_RAISE, all locked

libc = ctypes.CDLL(None, use_errno=True)
report_fd, work, argv = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])


def report(line):
    os.write(report_fd, (line + "\n").encode())


def check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, what + ": " + os.strerror(err))


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def setattr_mounts(path, flags, attr_set, attr_clr):
    attr = (ctypes.c_uint64 * 4)(attr_set, attr_clr, 0, 0)
    L = ctypes.c_long
    check(libc.syscall(L(SYS_MOUNT_SETATTR), L(AT_FDCWD), ctypes.c_char_p(path.encode()), L(flags),
                       ctypes.byref(attr), L(ctypes.sizeof(attr))), "mount_setattr " + path)


def enter_namespaces():
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID), "unshare")
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", "0 %d 1" % uid)
    write("/proc/self/gid_map", "0 %d 1" % gid)


def lock_down():
    """In init: read-only filesystem but the working directory, fresh /proc, no capabilities."""
    last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "private mounts")
    libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)  # best effort
    check(libc.mount(work.encode(), work.encode(), None, MS_BIND, None), "bind the working directory")
    setattr_mounts("/", AT_RECURSIVE, ATTR_RDONLY, 0)
    setattr_mounts(work, 0, ATTR_NOSUID | ATTR_NODEV | ATTR_NOEXEC, ATTR_RDONLY)
    os.chdir(work)  # the old cwd is on the now read-only mount under the bind
    check(libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_NOROOT, 0, 0, 0), "securebits")
    for cap in range(last_cap + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), "drop capability %d" % cap)
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def init():
    """pid 1 of the new pid namespace: when it exits, the kernel kills every process left in it."""
    libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    try:
        lock_down()
    except OSError as e:
        report("error " + str(e))
        os._exit(125)
    child = os.fork()
    if child == 0:
        os.close(report_fd)
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    while True:  # reap orphans too; stop when the code's process is done
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            report("status %d" % status)
            os._exit(0)


try:
    enter_namespaces()
except OSError as e:
    report("error " + str(e))
    os._exit(125)
pid = os.fork()
if pid == 0:
    init()
os.waitpid(pid, 0)
'''


# ----------------------------------------------------------------------------------------- trainer side

def _child_env(workdir: str) -> dict:
    """A fresh environment: nothing inherited (tokens, proxies, PYTHON* settings)."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
            # RLIMIT_AS and RLIMIT_NPROC are easily exceeded by BLAS thread pools
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _rlimits(limits: SandboxLimits) -> List[Tuple[str, int, int]]:
    """(name, soft, hard) for the bootstrap's resource.setrlimit calls."""
    mib = 1024 * 1024
    cpu = max(1, int(limits.cpu_seconds))
    return [("RLIMIT_CORE", 0, 0),
            # the soft limit sends SIGXCPU, the hard one (a second later) SIGKILL for code that ignores it
            ("RLIMIT_CPU", cpu, cpu + 1),
            ("RLIMIT_AS", int(limits.memory_mb) * mib, int(limits.memory_mb) * mib),
            ("RLIMIT_NPROC", int(limits.max_processes), int(limits.max_processes)),
            ("RLIMIT_FSIZE", int(limits.max_file_mb) * mib, int(limits.max_file_mb) * mib)]


def _bootstrap_argv(workdir: str, limits: SandboxLimits, audit: bool) -> List[str]:
    config = {"workdir": workdir, "main": MAIN_FILE, "audit": audit, "rlimits": _rlimits(limits)}
    return [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(config)]


def _remove_tree(path: str) -> None:
    """rmtree that also copes with directories the code made unreadable (chmod 000). Called when
    every process of the run is dead, so nothing can swap paths under it."""
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            sub = os.path.join(root, name)
            if not os.path.islink(sub):  # chmod follows symlinks: never touch anything outside
                try:
                    os.chmod(sub, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)


def _has_exited(pid: int) -> bool:
    """Whether the child is dead, WITHOUT reaping it: an unreaped leader keeps its process group id
    reserved, so the killpg that follows cannot hit a group that reused the number."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _descendants(pid: int) -> list:
    try:
        import psutil
        return psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing, or the process already gone
        return []


def _kill_tree(pid: int, namespaces: bool) -> None:
    """SIGKILL the run's process group (the launcher and init too, in namespace mode: init's death
    takes the whole pid namespace with it) and any descendant that left the group with setsid; then
    wait until they are gone. In namespace mode the kernel kills the namespace's processes when init
    dies, but not at once: a run must not return while any of them still runs."""
    tree = _descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in tree:
        try:
            proc.kill()  # psutil checks the process is still the one it saw (pid reuse)
        except Exception:
            pass
    deadline = time.monotonic() + 5
    while any(_running(proc) for proc in tree) and time.monotonic() < deadline:
        time.sleep(0.005)


def _running(proc) -> bool:
    """Whether a psutil process still runs (a zombie has ended: only its exit status is left to collect)."""
    try:
        return proc.is_running() and proc.status() != "zombie"
    except Exception:  # gone
        return False


class _Output:
    """Reads the child's pipes without ever holding more than cap + one chunk per stream."""

    CHUNK = 65536

    def __init__(self, fds: dict, caps: dict):
        self.selector = selectors.DefaultSelector()
        self.data = {name: bytearray() for name in fds}
        self.caps = caps
        self.overflow = False
        for name, fd in fds.items():
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ, name)

    @property
    def open(self) -> bool:
        return bool(self.selector.get_map())

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
            if len(buf) > self.caps[key.data]:
                self.overflow = True

    def close(self) -> None:
        self.selector.close()


def _decode(data: bytearray, cap: int) -> str:
    text = bytes(data[:cap]).decode("utf-8", errors="replace")
    return text + TRUNCATION_MARKER if len(data) > cap else text


def _watch(proc: subprocess.Popen, output: _Output, deadline: float) -> str:
    """Read output until the run ends; return "wall time", "output truncated" or ""."""
    exited_at = None
    while output.open:
        now = time.monotonic()
        if now >= deadline:
            return "wall time"
        if exited_at is None and _has_exited(proc.pid):
            exited_at = now
        if exited_at is not None and now - exited_at > _EXIT_GRACE_S:
            return ""  # something the code left behind holds the pipes; it is killed next
        output.read(min(deadline - now, 0.1))
        if output.overflow:
            return "output truncated"
    while not _has_exited(proc.pid):  # pipes closed, process still finishing
        if time.monotonic() >= deadline:
            return "wall time"
        time.sleep(0.005)
    return ""


def _parse_report(report: bytes) -> Tuple[Optional[int], Optional[str]]:
    """(wait status of the code, setup error) from the namespace launcher's report pipe."""
    status, error = None, None
    for line in report.decode("utf-8", "replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "status":
            status = int(rest)
        elif kind == "error":
            error = rest
    return status, error


def _reason(returncode: int, stderr: str, ended_by: str) -> Tuple[str, bool]:
    """(reason, timed_out) from how the run ended."""
    if ended_by:
        return ended_by, ended_by == "wall time"
    if returncode == -signal.SIGXCPU:
        return "cpu time", True
    if returncode == -signal.SIGKILL:
        return "killed", False  # the hard CPU limit or the kernel's OOM killer
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}", False
        except ValueError:
            return f"signal {-returncode}", False
    if returncode != 0 and "MemoryError" in stderr[-2000:]:
        return "memory", False
    return "", False


def _execute(workdir: str, stdin: str, limits: SandboxLimits, namespaces: bool, audit: bool) -> SandboxResult:
    argv = _bootstrap_argv(workdir, limits, audit)
    report_r = report_w = None
    if namespaces:
        report_r, report_w = os.pipe()
        argv = [sys.executable, "-I", "-c", _LAUNCHER, str(report_w), workdir, json.dumps(argv)]
    start = time.monotonic()
    try:
        # stdin from an unlinked file: no writer thread, no deadlock with a child that does not read it
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.seek(0)
            proc = subprocess.Popen(argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=workdir, env=_child_env(workdir), start_new_session=True,
                                    close_fds=True, pass_fds=(report_w,) if namespaces else ())
    except OSError as e:
        for fd in (report_r, report_w):
            if fd is not None:
                os.close(fd)
        return SandboxResult(-1, "", "", False, f"spawn failed: {e}", time.monotonic() - start)
    if report_w is not None:
        os.close(report_w)  # only the launcher writes; EOF comes when its namespace is gone

    fds = {"stdout": proc.stdout.fileno(), "stderr": proc.stderr.fileno()}
    caps = {"stdout": limits.max_output_bytes, "stderr": limits.max_output_bytes}
    if report_r is not None:
        fds["report"], caps["report"] = report_r, _REPORT_CAP
    output = _Output(fds, caps)
    try:
        ended_by = _watch(proc, output, start + limits.wall_seconds)
    finally:
        _kill_tree(proc.pid, namespaces)  # always: also clears anything the code left behind
        proc.wait()
        output.close()
        proc.stdout.close()
        proc.stderr.close()
        if report_r is not None:
            os.close(report_r)
    duration = time.monotonic() - start

    returncode = proc.returncode
    if namespaces:
        status, error = _parse_report(bytes(output.data["report"]))
        if error is not None:
            return SandboxResult(-1, "", _decode(output.data["stderr"], caps["stderr"]), False,
                                 f"sandbox setup failed: {error}", duration)
        if status is not None:
            returncode = os.waitstatus_to_exitcode(status)
    stderr = _decode(output.data["stderr"], caps["stderr"])
    reason, timed_out = _reason(returncode, stderr, ended_by)
    return SandboxResult(returncode, _decode(output.data["stdout"], caps["stdout"]), stderr, timed_out, reason,
                         duration)


# ------------------------------------------------------------------------------ choosing the isolation

_probe_lock = threading.Lock()
_probe: Optional[Tuple[bool, str]] = None


def namespace_support() -> Tuple[bool, str]:
    """(available, why not) for namespace mode, found by one real run per process (then cached)."""
    global _probe
    with _probe_lock:
        if _probe is None:
            _probe = _probe_namespaces()
            if not _probe[0]:
                log.info("sandbox: namespace isolation unavailable (%s); isolate='auto' uses 'none'", _probe[1])
        return _probe


def namespaces_available() -> bool:
    """Whether isolate="auto" runs in namespaces here."""
    return namespace_support()[0]


def _probe_namespaces() -> Tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, "not Linux"
    limits = SandboxLimits(cpu_seconds=5, wall_seconds=20)
    try:
        result = _run(
            "import os\nprint('ok', os.getpid(), open('/proc/self/status').read().count('CapEff:\\t0000000000000000'))",
            "", limits, namespaces=True, audit=True)
    except Exception as e:  # e.g. no writable temporary directory
        return False, f"probe failed: {e}"
    if result.reason:
        return False, result.reason
    if result.returncode != 0 or result.stdout.split() != ["ok", "2", "1"]:
        return False, f"probe run gave returncode {result.returncode}: {(result.stdout + result.stderr)[-300:]!r}"
    return True, ""


def _use_namespaces(isolate: str) -> bool:
    if isolate not in ISOLATION_MODES:
        raise ValueError(f"isolate must be one of {ISOLATION_MODES}, got {isolate!r}")
    if isolate == "none":
        return False
    available, why = namespace_support()
    if isolate == "namespaces" and not available:
        raise RuntimeError(f"namespace isolation is not available here: {why}")
    return available


# ------------------------------------------------------------------------------------------ public API

def _run(code: str, stdin: str, limits: SandboxLimits, namespaces: bool, audit: bool) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="msw-sandbox-")
    try:
        with open(os.path.join(workdir, MAIN_FILE), "w", encoding="utf-8") as f:
            f.write(code)
        return _execute(workdir, stdin, limits, namespaces, audit)
    finally:
        _remove_tree(workdir)


def run_python(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), isolate: str = "auto", *,
               _audit_hook: bool = True) -> SandboxResult:
    """Run ``code`` with ``stdin`` in a fresh sandbox (see the module docstring) and report what happened.

    Whatever the code does, this returns a result (a failed start is ``returncode=-1`` with a reason);
    it raises only for bad arguments, ``isolate="namespaces"`` where namespaces are unavailable, or
    when no temporary directory can be made. ``_audit_hook=False`` is for tests of the namespace
    boundary alone; never turn it off for real use.
    """
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise TypeError("code and stdin must be str")
    return _run(code, stdin, limits, _use_namespaces(isolate), _audit_hook)


JobLike = Union[SandboxJob, str, Tuple[str, str]]


class SandboxPool:
    """Runs jobs on ``workers`` threads, each job in its own sandboxed process.

    ``map`` returns the results in the order of the jobs. Use as a context manager or call ``close``.
    """

    def __init__(self, workers: int = 4, limits: SandboxLimits = SandboxLimits(), isolate: str = "auto"):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.limits = limits
        self.isolate = isolate
        self._namespaces = _use_namespaces(isolate)  # probe once here, not in every thread
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox")

    def run(self, code: str, stdin: str = "") -> SandboxResult:
        """One job, in the calling thread."""
        return _run(code, stdin, self.limits, self._namespaces, True)

    def map(self, jobs: Iterable[JobLike]) -> List[SandboxResult]:
        """Results in job order. Never raises for a job: a run that could not even be set up (say,
        no space for its directory) comes back as returncode -1 with reason "sandbox error: ..."."""
        jobs = [_as_job(job) for job in jobs]
        return list(self._executor.map(self._run_safely, jobs))

    def _run_safely(self, job: SandboxJob) -> SandboxResult:
        try:
            return self.run(job.code, job.stdin)
        except Exception as e:  # infrastructure trouble; the caller sees it in the reason
            return SandboxResult(-1, "", "", False, f"sandbox error: {type(e).__name__}: {e}", 0.0)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_job(job: JobLike) -> SandboxJob:
    if isinstance(job, SandboxJob):
        return job
    if isinstance(job, str):
        return SandboxJob(job)
    if isinstance(job, Sequence) and len(job) == 2:
        return SandboxJob(str(job[0]), str(job[1]))
    raise TypeError(f"a sandbox job is code, (code, stdin) or a SandboxJob; got {type(job).__name__}")
