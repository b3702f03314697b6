"""Training objectives, registered by ``task.name``.

A task class gives the forward step for megatron-core's schedules, any
per-step preparation (a reference model's log-probabilities), its metrics,
and says how it reads its data (``read_data``; None: the ``data.source``
readers), how many rows one sample is, and which output head the model has.
"""
from __future__ import annotations

from typing import Dict

from megatron_swift.tasks.dpo import DPOTask
from megatron_swift.tasks.kto import KTOTask
from megatron_swift.tasks.lm import LMTask
from megatron_swift.tasks.rm import RewardTask

TASKS: Dict[str, type] = {"lm": LMTask, "dpo": DPOTask, "kto": KTOTask, "rm": RewardTask}
REFERENCE = ("dpo", "kto")  # tasks with a frozen reference model


def task_class(name: str) -> type:
    return TASKS[name]


def build_task(cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".", model=None):
    """The task ``cfg.task.name`` for this run (validation has checked the name); ``datasets`` are
    (name, dataset) pairs a task may precompute over, results kept in ``output_dir``; ``model`` is the
    policy (a LoRA policy with its adapters disabled is its own reference)."""
    return TASKS[cfg.task.name].build(cfg, backend, arch, padded_vocab, datasets, output_dir, model=model)
