"""Which parameters train: LoRA's defaults, then train.freeze groups, train.freeze_regex, train.trainable_regex.

Patterns are matched (``re.search``) against global Megatron names
(tuners.names). A tied output layer is the embedding: both copies answer to
both names, so they are always frozen or trained together (megatron-core sums
their gradients across the first and last pipeline stages). Every pattern
must match some parameter on some rank, or the run stops with a message
listing real names.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_swift.backend import collective_device
from megatron_swift.config.validate import ConfigError
from megatron_swift.tuners import FREEZE_GROUPS

_EMBEDDING, _OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


def _aliases(name: str, param) -> Tuple[str, ...]:
    if getattr(param, "shared_embedding", False) and name.endswith((_EMBEDDING, _OUTPUT)):
        prefix = name[: -len(_EMBEDDING)] if name.endswith(_EMBEDDING) else name[: -len(_OUTPUT)]
        return (prefix + _EMBEDDING, prefix + _OUTPUT)  # a VLM's language model: "language_model." first
    return (name,)


def _rules(tuner, train, vlm: bool = False, groups: Optional[dict] = None) -> List[Tuple[str, str, bool]]:
    """(config key, pattern, trainable) in the order they apply; a VLM's vision encoder is frozen first unless
    train.train_vision (as the peers do: its features are what the projector learns to read). ``groups``: the
    model's own regexes for some train.freeze groups (a held tower's vision / projector split)."""
    patterns = {**FREEZE_GROUPS, **(groups or {})}
    rules = []
    if vlm and not train.train_vision:
        rules.append(("train.train_vision=false", patterns["vision"], False))
    if tuner.name == "lora":
        rules += [(f"tuner.modules_to_save={m}", rf"(^|\.){re.escape(m)}(\.|$)", True) for m in tuner.modules_to_save]
    rules += [(f"train.freeze={g}", patterns[g], False) for g in train.freeze]
    if train.freeze_regex:
        rules.append((f"train.freeze_regex={train.freeze_regex!r}", train.freeze_regex, False))
    if train.trainable_regex:
        rules.append((f"train.trainable_regex={train.trainable_regex!r}", train.trainable_regex, True))
    return rules


def set_trainable(named: List[Tuple[str, torch.nn.Parameter]], tuner, train, vlm: bool = False,
                  groups: Optional[dict] = None) -> None:
    """Set requires_grad on every (global name, parameter); raises ConfigError for a pattern that matches nothing."""
    for _, param in named:  # with LoRA only the adapters train unless a rule says otherwise
        param.requires_grad_(tuner.name != "lora" or getattr(param, "is_lora", False))
    rules = _rules(tuner, train, vlm, groups)
    hits = torch.zeros(len(rules), device=collective_device())  # NCCL reduces only GPU tensors
    for i, (_, pattern, trainable) in enumerate(rules):
        regex = re.compile(pattern)
        for name, param in named:
            if any(regex.search(alias) for alias in _aliases(name, param)):
                param.requires_grad_(trainable)
                hits[i] += 1
    if dist.is_initialized():
        dist.all_reduce(hits)  # under PP a pattern may match on another stage only
    missing = [key for (key, _, _), n in zip(rules, hits.tolist()) if n == 0]
    if missing:
        examples = ", ".join(name for name, _ in named[:: max(1, len(named) // 6)][:6])
        raise ConfigError([f"{key} matches no parameter; names look like: {examples}" for key in missing])


def summary(named: List[Tuple[str, torch.nn.Parameter]]) -> str:
    """Trainable/total counts on this rank and the trainable groups (layer numbers folded)."""
    total = sum(p.numel() for _, p in named)
    trainable = [(n, p) for n, p in named if p.requires_grad]
    count = sum(p.numel() for _, p in trainable)
    groups = Counter()
    for name, param in trainable:
        groups[re.sub(r"\.\d+\.", ".*.", name)] += param.numel()
    shown = ", ".join(f"{g} ({n / 1e6:.3f}M)" for g, n in groups.most_common(8))
    more = f" and {len(groups) - 8} more groups" if len(groups) > 8 else ""
    return (f"trainable parameters on this rank: {count / 1e6:.3f}M of {total / 1e6:.3f}M "
            f"({100 * count / max(total, 1):.2f} %): {shown or 'none'}{more}")
