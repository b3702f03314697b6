"""Training objectives, registered by ``task.name``: each gives the forward step for megatron-core's
schedules, any per-step preparation (a reference model's log-probabilities), and its metrics."""
from __future__ import annotations

from typing import Callable, Dict

from megatron_swift.tasks.dpo import DPOTask
from megatron_swift.tasks.lm import LMTask

TASKS: Dict[str, Callable] = {"lm": LMTask.build, "dpo": DPOTask.build}
PREFERENCE = ("dpo",)  # tasks whose data rows are preference pairs


def build_task(cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = "."):
    """The task ``cfg.task.name`` for this run (validation has checked the name); ``datasets`` are
    (name, dataset) pairs a task may precompute over, results kept in ``output_dir``."""
    return TASKS[cfg.task.name](cfg, backend, arch, padded_vocab, datasets, output_dir)
