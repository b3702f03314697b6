"""Graceful stop: SIGTERM, SIGINT and SIGUSR1 (and a wall-clock budget) end the run after the current step,
with a checkpoint.

SLURM sends SIGTERM at preemption and at the time limit (and our sbatch script
forwards SIGUSR1 before it), torchrun forwards the SIGTERM/SIGINT it receives to
its workers, Ctrl-C sends SIGINT. A handler only records the request; the loop
asks ``StopRequests.check`` once per step, the ranks agree (one tiny all-reduce:
a signal may reach some ranks before others, or only some), and every rank
saves and leaves together.

One event often arrives twice (SLURM signals every process of the step, and
torchrun forwards the same signal to its workers a moment later), so a repeat
within ``REPEAT_WINDOW_S`` counts as the same request. A signal after that
aborts at once, the way the signal's default action would.
"""
from __future__ import annotations

import signal
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_swift.backend import collective_device

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_WINDOW_S = 5.0
_DURATION = 1000  # reason code of the wall-clock budget (above every signal number)


class StopRequests:
    """Records stop requests on this rank; ``check`` turns them into one decision for all ranks."""

    def __init__(self, exit_duration_minutes: Optional[float] = None, started: Optional[float] = None):
        self.deadline = None if exit_duration_minutes is None else \
            (started or time.monotonic()) + 60.0 * exit_duration_minutes
        self.signum: Optional[int] = None
        self._first_at = 0.0
        self._previous: Dict[int, object] = {}

    def install(self) -> "StopRequests":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
            return
        if now - self._first_at < REPEAT_WINDOW_S:
            return  # the same event, delivered again
        # A second request: stop now, as the signal itself would have.
        self.uninstall()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)

    def check(self) -> Optional[str]:
        """Why the run must stop after this step (same answer on every rank), or None. Collective."""
        code = float(self.signum or 0)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            code = max(code, _DURATION)
        flag = torch.tensor([code], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        code = int(flag.item())
        if code == 0:
            return None
        if code == _DURATION:
            return "train.exit_duration_minutes reached"
        return signal.Signals(code).name
