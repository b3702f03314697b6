"""The layout planner counts a task's frozen reference copy: one for DPO, none for CPO/SimPO/ORPO, a
precomputed reference or LoRA's base."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_swift.config.compose import compose
from megatron_swift.models.arch import resolve
from megatron_swift.plan.memory import layout_of, rank_memory

BASE = ["+model=qwen3", "model.size=8b", "data=prefs", "train.global_batch_size=8"]


@pytest.mark.parametrize("overrides,copies", [
    (["task=dpo"], 1), (["task=kto", "data=kto"], 1), (["task=dpo", "task.precompute_ref=true"], 0),
    (["task=dpo", "tuner=lora"], 0), (["task=cpo"], 0), (["task=simpo"], 0), (["task=orpo"], 0), ([], 0),
])
def test_reference_copies_in_the_plan(overrides, copies):
    cfg = compose([*BASE, *overrides])
    layout = layout_of(cfg, 8)
    assert layout.reference_copies == copies
    arch = resolve(cfg.model)
    arch = dataclasses.replace(arch, vocab_size=arch.vocab_size or 151936)
    with_ref = rank_memory(arch, 151936, layout, 4096)
    without = rank_memory(arch, 151936, dataclasses.replace(layout, reference_copies=0), 4096)
    # a frozen copy of this rank's weights in the compute dtype, nothing else
    assert with_ref.total - without.total == copies * without.weights == with_ref.reference
