"""A second parallel layout in the same job: a frozen model (GKD's teacher) built and run with its own
tensor-parallel size while the trained model keeps the run's.

megatron-core 0.16 keeps its process groups in module globals of ``megatron.core.parallel_state`` and reads
them when modules are built (each linear keeps its ``tp_group``) and while they run (the schedules, the
weight loader, our vocabulary hooks). Building a model under other groups is therefore: make a second set
of those globals once (``initialize_model_parallel`` with the other sizes, a collective every rank joins),
and swap them in around the other model's build and forward passes (``Layout.active``). This is the one
place that touches megatron-core's globals for it; the trained model never sees the second set.
"""
from __future__ import annotations

import contextlib
import types
from typing import Dict

from megatron.core import parallel_state as ps


def _state() -> Dict[str, object]:
    """parallel_state's module-level state: its ``_NAMED`` globals (groups, ranks, sizes, buffers)."""
    return {k: v for k, v in vars(ps).items()
            if k.startswith("_") and not k.startswith("__")
            and not isinstance(v, (types.FunctionType, types.ModuleType, type))}


def _load(state: Dict[str, object]) -> None:
    for k, v in state.items():
        setattr(ps, k, v)


class Layout:
    """parallel_state's globals for another layout (tensor parallelism only; pp = cp = ep = 1)."""

    def __init__(self, tp: int, timeout_minutes: int = 30):
        run = _state()
        # initialize_model_parallel refuses to run over existing groups: start it from empty globals.
        _load({k: ({} if isinstance(v, dict) else None) for k, v in run.items()})
        try:
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, distributed_timeout_minutes=timeout_minutes)
            self.state = _state()
        finally:
            _load(run)
        self.tp = tp

    @contextlib.contextmanager
    def active(self):
        """This layout's groups inside the block, the run's after it."""
        run = _state()
        _load(self.state)
        try:
            yield self
        finally:
            _load(run)

    @property
    def tp_group(self):
        return self.state["_TENSOR_MODEL_PARALLEL_GROUP"]

    @property
    def tp_ranks(self):
        """Global ranks of this rank's tensor-parallel group, in group-rank order."""
        return list(self.state["_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS"])
