"""train.vision_lr / train.projector_lr: which parameters are a VLM's vision tower and projector, marked with an
attribute that training/optim.py turns into megatron-core optimizer parameter groups (ParamKey(attr=...)).

The parts are the train.freeze groups of the same names (tuners.FREEZE_GROUPS, or the model's own regexes for a
held tower), matched on global names before DDP wraps the model: under DDP the names megatron-core's optimizer
sees carry wrapper prefixes, so the regexes cannot be handed to it directly."""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch

from megatron_swift.tuners import FREEZE_GROUPS

PARTS = ("vision", "projector")


def attribute(part: str) -> str:
    """The parameter attribute that marks a member of ``part``."""
    return f"lr_part_{part}"


def mark(named: List[Tuple[str, torch.nn.Parameter]], train, groups: Dict[str, str]) -> None:
    """Mark the parameters of each part whose learning rate the config sets (global names, ``groups``: the model's
    own train.freeze regexes, as tuners.freeze uses them)."""
    patterns = {**FREEZE_GROUPS, **(groups or {})}
    for part in PARTS:
        if getattr(train, f"{part}_lr", None) is None:
            continue
        regex = re.compile(patterns[part])
        for name, param in named:
            if regex.search(name):
                setattr(param, attribute(part), True)


def overrides(train) -> dict:
    """{ParamKey: ParamGroupOverride} of the parts with their own learning rate: max_lr the part's, min_lr the run's
    scaled by the same ratio, so warmup and decay (megatron-core's scheduler reads both per group) keep each
    part at part_lr / train.lr times the run's lr at every step."""
    from megatron.core.optimizer import ParamGroupOverride, ParamKey

    out = {}
    for part in PARTS:
        lr = getattr(train, f"{part}_lr", None)
        if lr is None:
            continue
        ratio = lr / train.lr if train.lr > 0 else 0.0
        out[ParamKey(attr=attribute(part))] = ParamGroupOverride(max_lr=float(lr), min_lr=train.min_lr * ratio)
    return out
