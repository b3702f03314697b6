"""Checkpoint-writer processes die with their training rank.

megatron-core 0.16's torch_dist saver (dist_checkpointing/strategies/filesystem_async.py)
writes each rank's shards from forked child processes and collects their
results through a queue served by a ``multiprocessing.Manager`` process that it
spawns on the first save and keeps for the life of the rank. When a rank is
killed (SIGKILL, OOM killer, a node agent tearing the job down) neither is told:
the manager process waits forever, and a writer whose result does not fit in
the pipe blocks at exit. Conversely, a stop request must not reach them: torchrun
forwards SIGTERM/SIGINT with ``killpg`` to each worker's whole process group and
SLURM signals every process of the job step, so the writers and the manager
would die mid-save while the rank itself (training.stop) finishes its step and
saves. So both ignore the stop signals and take Linux's parent-death signal
instead:

- forked writers: an ``os.register_at_fork`` hook sets ``PR_SET_PDEATHSIG`` in
  every child forked by this rank (the writers are forked from the main thread,
  which lives as long as the rank);
- the results queue: created here, before megatron-core would, on a manager
  whose server process sets ``PR_SET_PDEATHSIG`` in its initializer, and put
  into megatron-core's module-level ``_results_queue`` slot, which
  ``_get_write_results_queue`` then returns.

A no-op off Linux (no prctl).
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
    """Tie this rank's checkpoint-writer processes to it (idempotent; call once per rank before saving)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    _installed = True
    os.register_at_fork(after_in_child=_die_with_parent)
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        from multiprocessing.managers import SyncManager

        server = SyncManager(ctx=mp.get_context("spawn"))  # what megatron-core's mp.Manager() would start
        server.start(initializer=_die_with_parent)
        filesystem_async._results_queue = server.Queue()
        filesystem_async._megatron_swift_manager = server  # keep the manager (and its process) referenced
