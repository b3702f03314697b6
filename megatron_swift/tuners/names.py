"""Global names of a model chunk's parameters and modules.

Inside a pipeline stage (or a virtual stage) megatron-core numbers layers from
0, and an expert-parallel rank numbers its experts from 0. Users write
regexes and export tables speak of the whole model, so names here carry the
global layer and expert numbers (``decoder.layers.17.mlp.experts.local_experts.5``).
"""
from __future__ import annotations

import re
from typing import Dict

from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

_LAYER = re.compile(r"(^|\.)(layers\.)(\d+)(?=\.|$)")
_EXPERT = re.compile(r"(\.local_experts\.)(\d+)(?=\.|$)")


def offsets(chunk, vp_stage: int, num_chunks: int) -> Dict[str, int]:
    """Global index of this chunk's layer 0 and of this rank's expert 0."""
    experts = getattr(chunk.config, "num_moe_experts", None) or 0
    return dict(layer=get_transformer_layer_offset(chunk.config, vp_stage=vp_stage if num_chunks > 1 else None),
                expert=ps.get_expert_model_parallel_rank() * (experts // ps.get_expert_model_parallel_world_size()))


def to_global(name: str, offset: Dict[str, int]) -> str:
    name = _LAYER.sub(lambda m: f"{m.group(1)}{m.group(2)}{int(m.group(3)) + offset['layer']}", name, count=1)
    return _EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset['expert']}", name, count=1)


def global_parameters(chunks):
    """(global name, parameter) of every parameter of the chunks."""
    for i, chunk in enumerate(chunks):
        offset = offsets(chunk, i, len(chunks))
        for name, param in chunk.named_parameters():
            yield to_global(name, offset), param


def global_modules(chunks):
    """(global name, module) of every module of the chunks."""
    for i, chunk in enumerate(chunks):
        offset = offsets(chunk, i, len(chunks))
        for name, module in chunk.named_modules():
            yield to_global(name, offset), module
