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


@pytest.fixture(scope="module")
def teacher_config(tmp_path_factory):
    """A tiny Qwen3 teacher's config.json (the planner reads the architecture alone) and its HF model."""
    import transformers

    config = transformers.Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
    folder = tmp_path_factory.mktemp("teacher")
    config.save_pretrained(folder)
    return folder, transformers.Qwen3ForCausalLM(config)


def _plan(overrides):
    cfg = compose(["+model=qwen3", "model.size=tiny", "data=sft", "data.tokenizer=byte", "task=gkd", *overrides])
    layout = layout_of(cfg, 4)
    arch = resolve(cfg.model)
    arch = dataclasses.replace(arch, vocab_size=256)
    return layout, rank_memory(arch, 256, layout, 128, "bf16"), rank_memory(
        arch, 256, dataclasses.replace(layout, frozen=None), 128, "bf16")


@pytest.mark.parametrize("teacher_tp", [1, 2])
def test_gkd_teacher_weights_in_the_plan(teacher_config, teacher_tp):
    """task=gkd: the teacher's weights only (no gradients, optimizer state or activations), bf16, on its own
    TP size: on TP=1 transformers' parameter count (vocabulary 256 needs no padding); on TP=2 each rank holds
    half of every matrix and all of the norms. No reference copy."""
    folder, hf = teacher_config
    layout, with_teacher, without = _plan([f"task.teacher.model={folder}", "task.teacher.tokenizer=byte",
                                           f"task.teacher.tp={teacher_tp}", "parallel.tp=2"])
    assert layout.reference_copies == 0 and layout.frozen.tp == teacher_tp
    assert with_teacher.total - without.total == with_teacher.frozen
    params = sum(p.numel() for p in hf.parameters())
    norms = sum(p.numel() for n, p in hf.named_parameters() if "norm" in n)
    assert with_teacher.frozen == 2 * (params if teacher_tp == 1 else (params - norms) // 2 + norms)


def test_gkd_teacher_on_the_students_layout_follows_its_pipeline_stage(teacher_config):
    """task.teacher.tp unset: the teacher has the student's TP=2 and PP=2; the largest stage's rank holds half
    of its layers (and its embedding or output layer), split over TP."""
    folder, hf = teacher_config
    layout, one_stage, _ = _plan([f"task.teacher.model={folder}", "task.teacher.tokenizer=byte", "parallel.tp=2",
                                  "parallel.pp=2"])
    assert layout.frozen.tp is None
    per_stage = [rank_memory(resolve_tiny(), 256, layout, 128, "bf16", stage).frozen for stage in (0, 1)]
    params = sum(p.numel() for p in hf.parameters())
    norms = sum(p.numel() for n, p in hf.named_parameters() if "norm" in n)
    # both stages together hold the model once: the split matrices halved, every norm on one stage
    assert sum(per_stage) == 2 * ((params - norms) // 2 + norms)
    assert one_stage.frozen == rank_memory(resolve_tiny(), 256, layout, 128, "bf16", one_stage.stage).frozen


def resolve_tiny():
    cfg = compose(["+model=qwen3", "model.size=tiny"])
    return dataclasses.replace(resolve(cfg.model), vocab_size=256)
