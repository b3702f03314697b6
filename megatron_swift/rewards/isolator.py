"""What a sandboxed program sees: the bubblewrap command line of one box (``rewards/sandbox.py`` runs it).

The kernel boundary is bubblewrap's (Flatpak's isolator, a Debian/Fedora package), not code of ours. A
box has:

* new pid, network, IPC, UTS (and cgroup, where possible) namespaces: it sees only its own processes, has
  no network interface at all (abstract Unix sockets are per network namespace too), and dies with the
  trainer (``--die-with-parent``) in a session of its own (``--new-session``: no terminal to inject into);
* a root of its own: ``/usr`` and the Python runtime read-only (at ``/opt/python`` when it lives outside
  /usr, its installed packages hidden), the /bin, /lib... links of the host, a
  fresh ``/proc``, a read-only ``/dev`` with null, zero and urandom only, and ``/tmp`` as its working
  directory: an empty tmpfs capped at ``max_disk_mb`` holding the program. No home folders, no checkout,
  no host ``/tmp``, ``/run`` or ``/etc``: no host Unix socket or file is there to reach;
* no capabilities and no_new_privs, an environment of a few fixed variables, and a system-call filter
  (``rewards/seccomp.py``): no namespaces of its own, no kernel keyring, no io_uring, bpf or ptrace;
* a uid of its own when the trainer is root: bubblewrap runs privileged to build the root, then
  ``setpriv`` (util-linux) drops to that uid with empty capability sets before Python starts, so the
  kernel applies RLIMIT_NPROC and treats it as nobody in particular. A non-root trainer runs bubblewrap
  in a user namespace of its own (nested user namespaces disabled) under its own uid.

The program is ``python -I -S`` of the trainer's own interpreter (standard library only: site-packages,
and so the project itself, are not on its path).
"""
from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_swift.rewards.seccomp import filter_program

INSTALL_HINT = ("install it with sh tools/install_isolator.sh (Debian/Ubuntu: apt-get install bubblewrap libseccomp2; "
                "Fedora/RHEL: dnf install bubblewrap libseccomp), or set task.sandbox.isolation=none to run the code "
                "unisolated (only code you trust)")
WORKDIR = "/tmp"
_HOST_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
_ENV = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
        # one thread each: thread pools count against the process limit
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Box:
    """One sandboxed program: its files in the working directory, Python arguments, fds it inherits."""

    files: Dict[str, bytes]
    python_args: List[str]
    pass_fds: Tuple[int, ...] = ()
    uid: Optional[int] = None
    """Host uid to run as (root trainer only)."""
    _fds: List[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


BOX_RUNTIME = "/opt/python"
"""Where a runtime outside /usr appears in a box: its own host path may sit under a folder the box's user
cannot enter (pyenv's under /root), and the interpreter finds its standard library next to itself."""


def interpreter() -> str:
    """The real path of the base interpreter (a virtual environment's python is a link to it)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def runtime() -> Tuple[str, Optional[str]]:
    """(the interpreter's path inside a box, the host folder bound at BOX_RUNTIME or None when under /usr)."""
    exe, prefix = interpreter(), os.path.realpath(sys.base_prefix)
    if exe.startswith("/usr/") and (prefix == "/usr" or prefix.startswith("/usr/")):
        return exe, None
    if not exe.startswith(prefix + "/"):
        raise OSError(f"the interpreter {exe} is not inside its prefix {prefix}")
    return BOX_RUNTIME + exe[len(prefix):], prefix


def hidden_packages(prefix: Optional[str]) -> List[str]:
    """Box paths of the trainer's installed packages: a box runs ``python -S`` and sees empty folders there
    (nothing of the trainer's environment, the project's editable install included)."""
    import site

    found = []
    for path in site.getsitepackages() + [site.getusersitepackages()]:
        real = os.path.realpath(path)
        if prefix is not None and real.startswith(prefix + "/") and os.path.isdir(real):
            found.append(BOX_RUNTIME + real[len(prefix):])
        elif real.startswith("/usr/") and os.path.isdir(real):
            found.append(real)
    return sorted(set(found))


class Bubblewrap:
    """Builds the argv of a box (see the module docstring)."""

    name = "bubblewrap"

    def __init__(self, bwrap: str, setpriv: Optional[str]):
        self.bwrap, self.setpriv = bwrap, setpriv
        self.root = setpriv is not None
        self.exe, self.prefix = runtime()

    def argv(self, box: Box, disk_mb: int) -> List[str]:
        """The command line; opens fds (the program's files, the runtime folders) that ``box.close`` closes."""
        args = [self.bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv"]
        if self.root:
            # only what setpriv needs to drop to the box's uid; it clears every set before Python starts
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        else:
            args += ["--unshare-user", "--disable-userns"]
        for key, value in _ENV.items():
            args += ["--setenv", key, value]
        if self.prefix is not None:  # an interpreter linked with an absolute RUNPATH to its host folder
            args += ["--setenv", "LD_LIBRARY_PATH", f"{BOX_RUNTIME}/lib"]
        args += self._root_fs(box)
        args += ["--perms", "1777", "--size", str(int(disk_mb) * 1024 * 1024), "--tmpfs", WORKDIR]
        for name, data in box.files.items():
            fd = _memfd(name, data)
            box._fds.append(fd)
            args += ["--perms", "0444", "--file", str(fd), f"{WORKDIR}/{name}"]
        program, _ = filter_program()
        fd = _memfd("seccomp", program)
        box._fds.append(fd)
        args += ["--seccomp", str(fd), "--chdir", WORKDIR, "--"]
        if self.root:
            args += [self.setpriv, f"--reuid={box.uid}", f"--regid={box.uid}", "--clear-groups",
                     "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        return args + [self.exe, "-I", "-S", *box.python_args]

    def _root_fs(self, box: Box) -> List[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for path in _HOST_LINKS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        if self.prefix is not None:
            args += ["--perms", "0755", "--dir", os.path.dirname(BOX_RUNTIME)]  # made 0700 otherwise
            if self.root:  # bubblewrap opens it as root: the box's uid need not reach it on the host
                fd = os.open(self.prefix, os.O_PATH | os.O_DIRECTORY)
                box._fds.append(fd)
                args += ["--ro-bind-fd", str(fd), BOX_RUNTIME]
            else:
                args += ["--ro-bind", self.prefix, BOX_RUNTIME]
        for path in hidden_packages(self.prefix):
            args += ["--perms", "0755", "--size", "4096", "--tmpfs", path, "--remount-ro", path]
        args += ["--proc", "/proc", "--size", "65536", "--tmpfs", "/dev"]
        for dev in _DEVICES:
            args += ["--dev-bind", dev, dev]
        return args + ["--remount-ro", "/dev"]


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name)
    os.write(fd, data) if len(data) < 65536 else _write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def find_bubblewrap() -> Tuple[Optional[Bubblewrap], str]:
    """(the isolator, "") or (None, why it cannot be used)."""
    if not sys.platform.startswith("linux"):
        return None, "bubblewrap needs Linux"
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed"
    try:
        runtime()
    except OSError as e:
        return None, str(e)
    program, why = filter_program()
    if program is None:
        return None, f"the box's system-call filter cannot be built: {why}"
    setpriv = None
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None or not setpriv.startswith("/usr/"):
            return None, "setpriv (util-linux) is not installed under /usr: the box cannot drop root"
    return Bubblewrap(bwrap, setpriv), ""


class UidPool:
    """Host uids for boxes when the trainer is root: one per running box, so that RLIMIT_NPROC (per uid)
    counts one box's processes only. A uid is held with a lock file (in a root-only folder), so trainers
    on one machine (every data-parallel rank scores its own completions) never share one; the kernel
    drops the lock when a trainer dies. Uids that name an account on this machine are skipped."""

    def __init__(self, base: int, size: int = 4096):
        self.base, self.size = base, size
        self.folder = os.path.join(tempfile.gettempdir(), "msw-sandbox-uids")
        self._held: Dict[int, int] = {}
        self._lock = threading.Lock()

    def take(self) -> int:
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        with self._lock:
            for uid in range(self.base, self.base + self.size):
                if uid in self._held or _is_account(uid):
                    continue
                fd = os.open(os.path.join(self.folder, str(uid)), os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # another trainer's box runs as this uid
                    os.close(fd)
                    continue
                self._held[uid] = fd
                return uid
        raise RuntimeError(f"sandbox: no free uid in [{self.base}, {self.base + self.size})")

    def give(self, uid: Optional[int]) -> None:
        if uid is not None:
            with self._lock:
                fd = self._held.pop(uid, None)
            if fd is not None:
                os.close(fd)  # closing drops the lock


def _is_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False
