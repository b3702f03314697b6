"""One run per run folder: rank 0 holds an exclusive ``flock`` on the folder itself while the run lives.

Two runs in one folder would interleave metrics.jsonl, replace each other's ``iter_N`` and remove each
other's ``.tmp.iter_N`` mid-write. ``flock`` is released by the kernel when the process ends, however it
ends (SIGKILL, OOM killer), so a dead run never blocks the next one and there is no stale lock to clean
up. The lock is taken on the folder's own descriptor, which writes nothing: a run refused later (bad
data, a changed setting) leaves the folder as it found it. Once the run starts writing there
(``claim``), it also records who holds it in ``run.lock`` (pid, host, start time, command), for the
line a second run stops with. A file system without ``flock`` on folders (some network file systems)
gives a warning and the run goes on unlocked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Dict, Optional

from megatron_swift.config.validate import ConfigError

HOLDER = "run.lock"
_held: Dict[str, int] = {}  # folder -> descriptor: the lock lives as long as this process keeps it open


def _holder(folder: str) -> str:
    try:
        with open(os.path.join(folder, HOLDER), encoding="utf-8") as f:
            who = json.load(f)
        pid, host = int(who["pid"]), who["host"]
        if host == socket.gethostname():
            os.kill(pid, 0)  # the record may be a finished run's, left before the holder wrote its own
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
    return f"pid {pid} on {host}, started {who.get('started')}: {who.get('command', '?')}"


def acquire(output_dir: str) -> Optional[str]:
    """Lock an existing run folder for this process (a folder not there yet: nothing to lock, ``claim`` does it
    when the run creates it). Raises ConfigError naming the folder and the holder when another live process
    has it; returns a warning line when the file system cannot lock."""
    folder = os.path.abspath(output_dir)
    if folder in _held or not os.path.isdir(folder):
        return None
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError([f"run folder {output_dir} is in use by another run ({_holder(folder)}); wait for "
                               "it to end, or give this run another train.output_dir"]) from None
        return (f"megatron-swift: WARNING: cannot lock run folder {output_dir} ({e.strerror}); make sure no "
                "other run writes there")
    _held[folder] = fd
    return None


def claim(output_dir: str) -> Optional[str]:
    """Create the folder if needed, lock it (see ``acquire``) and record this process as its holder."""
    os.makedirs(output_dir, exist_ok=True)
    warning = acquire(output_dir)
    with open(os.path.join(output_dir, HOLDER), "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": " ".join(sys.argv)}, f)
    return warning


def release(output_dir: str) -> None:
    """Give the lock back before the process ends (tests; a process that ends releases it anyway)."""
    fd = _held.pop(os.path.abspath(output_dir), None)
    if fd is not None:
        os.close(fd)
