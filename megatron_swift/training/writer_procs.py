"""Checkpoint-writer processes die with their training rank; no results-queue manager process.

megatron-core 0.16's torch_dist saver (dist_checkpointing/strategies/filesystem_async.py)
writes each rank's shards from forked child processes. When a rank is killed
(SIGKILL, OOM killer, a node agent tearing the job down) they are not told, and a
writer whose result does not fit in the pipe blocks at exit. Conversely, a stop
request must not reach them: torchrun forwards SIGTERM/SIGINT with ``killpg`` to
each worker's whole process group and SLURM signals every process of the job
step, so the writers would die mid-save while the rank itself (training.stop)
finishes its step and saves. So they ignore the stop signals and take Linux's
parent-death signal instead: an ``os.register_at_fork`` hook sets
``PR_SET_PDEATHSIG`` in every child forked by this rank (the writers are forked
from the main thread, which lives as long as the rank).

The saver also collects the writers' results through a queue that it serves, on
the first save, from a ``multiprocessing.Manager`` process started with "spawn"
(for asynchronous saves, whose writing runs in another process). This project
saves synchronously: the rank puts the results and takes them back itself, so a
plain in-process ``queue.Queue`` is put into megatron-core's module-level
``_results_queue`` slot, which ``_get_write_results_queue`` then returns. No
manager process exists to outlive a killed rank, and the first save no longer
waits for one to start and import torch to unpickle the results (about 1.8 s).

Off Linux (no prctl) only the queue is set.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_installed = False


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def _die_with_parent() -> None:
    """In a writer process: end with the rank that started it, and only then."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl here: nothing to tie
        pass


def install() -> None:
    """Tie this rank's checkpoint-writer processes to it and give the saver an in-process results queue
    (idempotent; call once per rank before saving)."""
    global _installed
    if _installed:
        return
    _installed = True
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()  # sync saves: put and taken back by this rank
    if sys.platform.startswith("linux"):
        os.register_at_fork(after_in_child=_die_with_parent)
