"""What a run does not load from a checkpoint: set by model.init_strategy / model.new_token_init, and listed in
one start line (``initialised, not loaded: ...``)."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch.distributed as dist

from megatron_swift.models import init_strategy, new_tokens


def initialise(chunks, cfg, arch, padded_vocab: int, new: new_tokens.NewTokens, loaded: str,
               say: Callable[[str], None]) -> None:
    """``loaded``: "none" (a run from scratch), "marked" (HF weights: each loaded parameter carries
    ``loaded_from_checkpoint``) or "all" (model.load: every parameter, new-token rows included)."""
    model, seed = cfg.model, cfg.train.seed
    strategy = model.init_strategy
    items: List[str] = []
    if loaded != "all":
        unloaded = (lambda name, p: True) if loaded == "none" else \
            (lambda name, p: not getattr(p, "loaded_from_checkpoint", False))
        if strategy:
            groups = init_strategy.apply(chunks, arch, padded_vocab, strategy, seed, model.init_method_std, unloaded)
            counts: Dict[str, int] = {}
            for group, n in groups.items():
                counts[_label(group, arch)] = counts.get(_label(group, arch), 0) + n
            items += [f"{label} ({n} tensor{'s' if n > 1 else ''}, {strategy})" for label, n in counts.items()]
        else:
            names = [n for c in chunks for n, p in c.named_parameters() if p.dim() >= 2 and unloaded(n, p)]
            if names and loaded == "none":
                items.append(f"all parameters (megatron-core's default: normal, std {model.init_method_std})")
            elif names:
                items += list(dict.fromkeys(f"{_label(n, arch)} (megatron-core's default)" for n in names))
        items += new_tokens.init_rows(chunks, new, model.new_token_init, arch, seed, model.init_method_std)
    gathered = [items]
    if dist.is_initialized() and dist.get_world_size() > 1:  # pipeline stages hold different parameters
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, items)
    listed = list(dict.fromkeys(i for rank in gathered for i in rank))
    if listed:
        say("megatron-swift: initialised, not loaded: " + ", ".join(listed))


def _label(name: str, arch) -> str:
    """How the start line names a parameter group: a VLM's projector and a reward head by what they are, the rest
    by their Megatron names (layer numbers folded: decoder.layers.*.mlp.linear_fc1.weight)."""
    if "vision_projection." in name:
        return "vision projector"
    if arch.head == "reward" and name.endswith("output_layer.weight"):
        return "reward head"
    return name
