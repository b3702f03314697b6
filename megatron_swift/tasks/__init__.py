"""Training objectives, registered by ``task.name`` (the contract: tasks/base.py; configs: tasks/configs.py).

A task class gives the forward step for megatron-core's schedules, any
per-step preparation (a reference model's log-probabilities), its metrics,
and says how it reads its data (``read_data``; None: the ``data.source``
readers), how many rows one sample is, and which output head the model has.
"""
from __future__ import annotations

from megatron_swift.tasks import dpo, grpo, kto, lm, rm  # noqa: F401  (each registers its task)
from megatron_swift.tasks.base import TASKS, Task, register  # noqa: F401


def task_class(name: str) -> type:
    return TASKS[name]


def build_task(cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".", model=None):
    """The task ``cfg.task.name`` for this run (validation has checked the name); ``datasets`` are
    (name, dataset) pairs a task may precompute over, results kept in ``output_dir``; ``model`` is the
    policy (a LoRA policy with its adapters disabled is its own reference)."""
    return TASKS[cfg.task.name].build(cfg, backend, arch, padded_vocab, datasets, output_dir, model=model)
