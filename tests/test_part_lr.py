"""train.vision_lr / train.projector_lr as megatron-core optimizer groups: the scheduler keeps each part at
part_lr / lr times the run's lr through warmup and cosine decay (closed form computed here); config refusals."""
from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.usefixtures("world_of_one")

LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 4, 20


class _Parts(torch.nn.Module):
    """Parameters named like a VLM chunk's (models/vlm.py): a tower, a projector and a language model."""

    def __init__(self):
        super().__init__()
        self.vision_model = torch.nn.Linear(4, 4)
        self.vision_projection = torch.nn.Linear(4, 4)
        self.language_model = torch.nn.Linear(4, 4)


class SimpleArch:
    """What validate._part_lrs reads of an architecture."""

    def __init__(self, has_vision: bool):
        self.has_vision = has_vision


def _expected(step: int) -> float:
    """The run's lr by hand: linear warmup from 0, then cosine from LR to MIN_LR over the decay steps."""
    if step <= WARMUP:
        return LR * step / WARMUP
    ratio = (step - WARMUP) / (DECAY - WARMUP)
    return MIN_LR + 0.5 * (math.cos(math.pi * ratio) + 1) * (LR - MIN_LR)


def test_part_groups_follow_the_schedule_scaled():
    from types import SimpleNamespace

    from megatron.core.transformer import TransformerConfig

    from megatron_swift.config.schema import TrainConfig
    from megatron_swift.training.optim import build_optimizer, build_scheduler, wrap_model
    from megatron_swift.tuners import part_lr

    train = TrainConfig(lr=LR, min_lr=MIN_LR, lr_warmup_iters=WARMUP, lr_decay_iters=DECAY,
                        lr_decay_style="cosine", vision_lr=2.5e-4, projector_lr=3e-3)
    tconfig = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    par = SimpleNamespace(overlap_grad_reduce=False, overlap_param_gather=False, distributed_optimizer=False)
    chunk = _Parts()
    part_lr.mark(list(chunk.named_parameters()), train, {})
    model = wrap_model([chunk], tconfig, par)
    optimizer = build_optimizer(model, tconfig, train, par)
    scheduler = build_scheduler(optimizer, train, DECAY)
    ratios = {id(p): r for m, r in ((chunk.vision_model, 0.25), (chunk.vision_projection, 3.0),
                                    (chunk.language_model, 1.0)) for p in m.parameters()}
    groups = [g for g in optimizer.param_groups if g["params"]]
    seen = set()
    for step in (0, 1, 3, 4, 5, 9, 14, 19, 20):
        scheduler.num_steps = 0
        scheduler.step(step)
        for group in groups:
            ratio = {ratios[id(p)] for p in group["params"]}
            assert len(ratio) == 1, "a group mixes parts"
            seen |= ratio
            assert group["lr"] == pytest.approx(_expected(step) * ratio.pop(), rel=1e-12, abs=1e-15), step
    assert seen == {0.25, 3.0, 1.0}


@pytest.mark.parametrize("overrides,message", [
    (dict(vision_lr=1e-4), "train.vision_lr=0.0001: the vision group is frozen (set train.train_vision=true"),
    (dict(projector_lr=-1.0), "train.projector_lr=-1.0 must be >= 0"),
    (dict(projector_lr=1e-4, freeze=["projector"]), "train.projector_lr=0.0001: the projector group is frozen"),
])
def test_part_lr_refusals_on_a_vlm(overrides, message):
    from megatron_swift.config.schema import TrainConfig
    from megatron_swift.config.validate import _part_lrs

    problems = []
    _part_lrs(TrainConfig(**overrides), SimpleArch(True), "llava", problems)
    assert problems and problems[0].startswith(message), problems


def test_part_lr_refused_on_a_text_model():
    from megatron_swift.config.schema import TrainConfig
    from megatron_swift.config.validate import _part_lrs

    problems = []
    _part_lrs(TrainConfig(vision_lr=1e-4), SimpleArch(False), "qwen3", problems)
    assert problems == ["train.vision_lr=0.0001: a vision-language model's vision learning rate; +model=qwen3 "
                        "has no vision tower (remove it)"]
