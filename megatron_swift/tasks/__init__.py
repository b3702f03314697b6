"""Training objectives, registered by ``task.name`` (the contract: tasks/base.py; configs: tasks/configs.py).

A task class gives the forward step for megatron-core's schedules, any
per-step preparation (a reference model's log-probabilities), its metrics,
and says how it reads its data (``read_data``; None: the ``data.source``
readers), how many rows one sample is, and which output head the model has.
"""
from __future__ import annotations

import importlib

# The task modules import torch and megatron-core; the schemas (tasks/configs.py) do not. Loading the
# modules on first use keeps composing and validating a config (and --help) free of those imports.
_MODULES = ("cpo", "dpo", "gkd", "grpo", "kto", "lm", "orpo", "rm", "simpo")


def _load() -> dict:
    for name in _MODULES:
        importlib.import_module(f"{__name__}.{name}")  # each registers its task
    from megatron_swift.tasks.base import TASKS

    return TASKS


def __getattr__(name: str):
    if name == "TASKS":
        return _load()
    if name in ("Task", "register"):
        from megatron_swift.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def task_class(name: str) -> type:
    return _load()[name]


def build_task(cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".", model=None):
    """The task ``cfg.task.name`` for this run (validation has checked the name); ``datasets`` are
    (name, dataset) pairs a task may precompute over, results kept in ``output_dir``; ``model`` is the
    policy (a LoRA policy with its adapters disabled is its own reference)."""
    return _load()[cfg.task.name].build(cfg, backend, arch, padded_vocab, datasets, output_dir, model=model)
