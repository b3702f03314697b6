"""Limits of a whole sandbox job, not of each of its processes: a control group per job where the machine
lets us make one, else resource limits on processes that run under a uid of their own.

Why both: rlimits are per process (four processes of 400 MB each pass a 512 MB RLIMIT_AS) and the kernel
does not apply RLIMIT_NPROC to root. A cgroup counts every process of the job together (``pids.max``,
the memory limit, CPU usage), whatever uid it runs as. Making one needs a writable cgroup hierarchy with
the pids and memory controllers: root on a cgroup v1 machine, root at the top of a v2 hierarchy, or a v2
cgroup delegated to us whose ``cgroup.subtree_control`` already has pids and memory. Anywhere else
``detect()`` answers with rlimits only, and the sandbox's first log line says so.

A job's box joins its cgroup before it execs the isolator (``join_argv``: a ``/bin/sh`` that writes its
own pid into ``cgroup.procs`` and then execs), so nothing the job starts can be outside it.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional

log = logging.getLogger(__name__)

_ROOT = "/sys/fs/cgroup"
# Processes the isolator itself adds to a job (bubblewrap's monitor and its init in the pid namespace).
ISOLATOR_PROCESSES = 2


@dataclass
class JobCgroup:
    """One job's control group (one directory per hierarchy: v1 has several, v2 one)."""

    dirs: Dict[str, str]
    """controller ('pids', 'memory', 'cpuacct' on v1; 'unified' on v2) -> directory."""
    version: int

    def procs_files(self) -> List[str]:
        """The cgroup.procs files a process writes its pid into to join the job (one per hierarchy)."""
        return [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def pids(self) -> List[int]:
        found = set()
        for path in self.procs_files():
            found.update(int(p) for p in _read(path, "").split())
        return sorted(found)

    def cpu_seconds(self) -> Optional[float]:
        """CPU time used by every process of the job so far (None where the machine does not count it)."""
        if self.version == 2:
            match = re.search(r"^usage_usec (\d+)", _read(os.path.join(self.dirs["unified"], "cpu.stat"), ""), re.M)
            return int(match.group(1)) / 1e6 if match else None
        if "cpuacct" in self.dirs:
            text = _read(os.path.join(self.dirs["cpuacct"], "cpuacct.usage"), "")
            return int(text) / 1e9 if text.strip() else None
        return None

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the job for going over its memory limit."""
        if self.version == 2:
            text = _read(os.path.join(self.dirs["unified"], "memory.events"), "")
        else:
            text = _read(os.path.join(self.dirs["memory"], "memory.oom_control"), "")
        match = re.search(r"^oom_kill (\d+)", text, re.M)
        return bool(match and int(match.group(1)))

    def kill(self) -> None:
        """SIGKILL every process of the job (cgroup.kill on v2 where the kernel has it)."""
        if self.version == 2 and _write(os.path.join(self.dirs["unified"], "cgroup.kill"), "1"):
            return
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass

    def remove(self) -> None:
        """Remove the directories (only possible once the job has no process left)."""
        for path in dict.fromkeys(self.dirs.values()):
            try:
                os.rmdir(path)
            except OSError as e:
                log.debug("sandbox: cannot remove cgroup %s: %s", path, e)


class CgroupLimits:
    """Makes one cgroup per job under a directory of this process's own (removed when it exits)."""

    def __init__(self, bases: Dict[str, str], version: int):
        self.bases, self.version = bases, version
        self._count = 0
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        controllers = "pids, memory, cpu" if self.version == 2 else ", ".join(sorted(self.bases))
        return f"job limits by cgroup v{self.version} ({controllers})"

    def create(self, limits, boxes: int = 1) -> JobCgroup:
        with self._lock:
            self._count += 1
            name = f"job-{self._count}"
        dirs = {}
        try:
            for controller, base in self.bases.items():
                path = os.path.join(base, name)
                os.mkdir(path)
                dirs[controller] = path
            job = JobCgroup(dirs, self.version)
            self._set(job, limits, boxes)
        except OSError:
            JobCgroup(dirs, self.version).remove()
            raise
        return job

    def _set(self, job: JobCgroup, limits, boxes: int) -> None:
        memory = (int(limits.memory_mb) + int(limits.max_disk_mb)) * 1024 * 1024  # files in tmpfs are memory
        # the code's processes, each box's isolator, and the program of every other box (the harness)
        pids = int(limits.max_processes) + ISOLATOR_PROCESSES * boxes + boxes - 1
        if self.version == 2:
            d = job.dirs["unified"]
            settings = [("pids.max", pids), ("memory.max", memory), ("memory.swap.max", 0)]
            paths = [(os.path.join(d, f), v) for f, v in settings]
        else:  # memory + swap: the same bound, so that a machine with swap cannot page the job out past it
            paths = [(os.path.join(job.dirs["pids"], "pids.max"), pids),
                     (os.path.join(job.dirs["memory"], "memory.limit_in_bytes"), memory),
                     (os.path.join(job.dirs["memory"], "memory.memsw.limit_in_bytes"), memory)]
        for path, value in paths:
            if not _write(path, str(value)) and "swap" not in path and "memsw" not in path:
                raise OSError(f"cannot set {path}")  # (no swap accounting on this kernel: nothing to bound)


class RlimitLimits:
    """No cgroup: the per-process rlimits (and, for a root trainer, a uid per box) are all there is."""

    version = 0
    description = ("job limits by rlimits (no writable cgroup here: memory and CPU time are limited per process, "
                   "the number of processes per box)")

    def create(self, limits, boxes: int = 1) -> None:
        return None


_detected = None
_detect_lock = threading.Lock()


def detect():
    """CgroupLimits where this process can make cgroups with pids and memory, else RlimitLimits (cached)."""
    global _detected
    with _detect_lock:
        if _detected is None:
            _detected = _try_v2() or _try_v1() or RlimitLimits()
            if isinstance(_detected, CgroupLimits):
                import atexit
                atexit.register(_remove_bases, _detected)
        return _detected


def join_argv(job: Optional[JobCgroup]) -> List[str]:
    """argv prefix that moves the process into ``job`` before exec'ing the rest of the command line."""
    if job is None:
        return []
    script = 'for f; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'
    return ["/bin/sh", "-c", script, "sh", *job.procs_files(), "--"]


# ------------------------------------------------------------------------------------------ detection

def _own_cgroups() -> Dict[str, str]:
    """hierarchy ('0' for v2, else its controllers joined by ',') -> this process's cgroup path."""
    out = {}
    for line in _read("/proc/self/cgroup", "").splitlines():
        hid, controllers, path = line.split(":", 2)
        out["0" if hid == "0" else controllers] = path
    return out


def _mounts(fstype: str) -> List[tuple]:
    """(mount point, root inside the hierarchy, super options) of every mount of ``fstype``."""
    found = []
    for line in _read("/proc/self/mountinfo", "").splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(rfields) >= 3 and rfields[0] == fstype:
            found.append((fields[4], fields[3], rfields[2]))
    return found


def _base_dir(mount: str, root: str, path: str) -> Optional[str]:
    rel = os.path.relpath(path, root) if path.startswith(root) else None
    if rel is None:
        return None
    return os.path.normpath(os.path.join(mount, rel if rel != "." else "", f"msw-sandbox-{os.getpid()}"))


def _try_v1() -> Optional[CgroupLimits]:
    own = _own_cgroups()
    bases: Dict[str, str] = {}
    for mount, root, options in _mounts("cgroup"):
        for controller in ("pids", "memory", "cpuacct"):
            if controller in options.split(","):
                path = next((p for h, p in own.items() if controller in h.split(",")), None)
                base = _base_dir(mount, root, path) if path else None
                if base:
                    bases.setdefault(controller, base)
    if "pids" not in bases or "memory" not in bases:
        return None
    return _make_bases(bases, 1)


def _try_v2() -> Optional[CgroupLimits]:
    own = _own_cgroups().get("0")
    for mount, root, _options in _mounts("cgroup2"):
        if own is None:
            continue
        base = _base_dir(mount, root, own)
        if base is None:
            continue
        parent = os.path.dirname(base)
        enabled = _read(os.path.join(parent, "cgroup.subtree_control"), "").split()
        if not {"pids", "memory"} <= set(enabled):
            if parent != mount or not _write(os.path.join(parent, "cgroup.subtree_control"), "+pids +memory"):
                continue  # enabling controllers in a cgroup that holds processes is refused by v2
        made = _make_bases({"unified": base}, 2)
        if made and _write(os.path.join(base, "cgroup.subtree_control"), "+pids +memory"):
            return made
        if made:
            _remove_bases(made)
    return None


def _make_bases(bases: Dict[str, str], version: int) -> Optional[CgroupLimits]:
    _remove_stale(bases)
    made = []
    for path in dict.fromkeys(bases.values()):
        try:
            os.makedirs(path, exist_ok=True)
            made.append(path)
        except OSError:
            for p in made:
                _rmdir_tree(p)
            return None
    return CgroupLimits(bases, version)


def _remove_stale(bases: Dict[str, str]) -> None:
    """Directories left by trainers that died (their pid is in the name and no longer runs)."""
    for base in set(bases.values()):
        parent = os.path.dirname(base)
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            match = re.fullmatch(r"msw-sandbox-(\d+)", name)
            if match and not _alive(int(match.group(1))):
                _rmdir_tree(os.path.join(parent, name))


def _remove_bases(limits: CgroupLimits) -> None:
    for path in dict.fromkeys(limits.bases.values()):
        _rmdir_tree(path)


def _rmdir_tree(path: str) -> None:
    """rmdir of a cgroup directory and its (empty) job directories."""
    try:
        for name in os.listdir(path):
            if os.path.isdir(os.path.join(path, name)) and name.startswith("job-"):
                os.rmdir(os.path.join(path, name))
        os.rmdir(path)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str, default: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def _write(path: str, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError:
        return False
