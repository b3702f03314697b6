"""Megatron parameters -> HF tensors by a family's table: what whole-model export (hf_export) and LoRA export
(lora_export, merging into a base read from a checkpoint) both use, kept apart so neither imports the other
for it."""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch

from megatron_swift.convert.hf_load import context_of, match_rule


def hf_tensors(params: Iterable[Tuple[str, torch.Tensor]], rules, ctx, layer_offset: int,
               dtype: torch.dtype) -> Iterable[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) for unsharded Megatron parameters; ``layer_offset`` turns layer 0 into the real index.
    ``ctx``: a Context, or a function of the parameter's name giving its Context (a VLM's vision encoder).
    A rule whose HF tensor stacks every expert of a layer (rules.StackedExperts) gives one piece per expert:
    the tensor is yielded once all of them are here (``params`` holds a whole layer)."""
    pending: Dict[str, Dict[int, torch.Tensor]] = {}
    for name, param in params:
        rule, layer = match_rule(name, rules, {"layer": layer_offset}, "export")
        stacked = getattr(rule, "experts", 0)
        for hf_name, tensor in rule.split(param, layer, context_of(ctx, name)).items():
            if stacked:
                pieces = pending.setdefault(hf_name, {})
                pieces[int(layer["expert"])] = tensor
                if len(pieces) < stacked:
                    continue
                tensor = torch.cat([pieces.pop(i) for i in range(stacked)])
                del pending[hf_name]
            yield hf_name, tensor.to(torch.float32 if getattr(rule, "fp32", False) else dtype)
    if pending:
        name, pieces = next(iter(pending.items()))
        raise ValueError(f"export: {name} stacks every expert of a layer, but only experts {sorted(pieces)} came "
                         "together")
