"""Stream HF safetensors into this rank's sharded Megatron model chunks.

Each Megatron parameter is matched to a rule of the family's weight table,
built from the HF tensors it names (read lazily, one tensor at a time, from
the safetensors files), cut to this rank's tensor-parallel shard and copied in.
Nothing is pickled: only safetensors are read.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_swift.data.errors import DataError


class SafetensorsFolder:
    """Tensors of an HF folder (``model.safetensors`` or a sharded set with its index), opened lazily."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        self._open = safe_open
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                self.file_of = dict(json.load(f)["weight_map"])
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self.file_of = {k: "model.safetensors" for k in f.keys()}
        else:
            raise DataError(folder, None, "no model.safetensors or model.safetensors.index.json (model.pretrained)")
        self._handles: Dict[str, object] = {}

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise DataError(self.folder, None, f"tensor '{name}' is missing from the checkpoint")
        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = self._open(os.path.join(self.folder, file), framework="pt")
        return self._handles[file].get_tensor(name)


@dataclass(frozen=True)
class Context:
    """What transforms need to know about the model and layout."""

    num_query_groups: int
    kv_channels: int
    padded_vocab: int
    tp: int
    vocab_size: int = 0


def compile_rules(rules) -> List[Tuple[re.Pattern, object]]:
    compiled = []
    for rule in rules:
        for name in rule.mcore:
            pattern = re.escape(name).replace(re.escape("{layer}"), r"(?P<layer>\d+)")
            compiled.append((re.compile(pattern + "$"), rule))
    return compiled


def load_hf_weights(chunks, folder: str, arch, padded_vocab: int) -> None:
    """Fill every parameter of ``chunks`` (this rank's GPTModels) from the HF folder."""
    if arch.family.weights is None:
        raise DataError(folder, None, f"loading HF weights is not supported yet for family {arch.family.name}")
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    rules = compile_rules(arch.family.weights(tied=not arch.untie_embeddings))
    ctx = Context(arch.num_query_groups, arch.kv_channels, padded_vocab, tp)
    reader = SafetensorsFolder(folder)
    vpp = len(chunks)
    for vp_stage, chunk in enumerate(chunks):
        offset = get_transformer_layer_offset(chunk.config, vp_stage=vp_stage if vpp > 1 else None)
        for name, param in chunk.named_parameters():
            _load_param(name, param, rules, reader, offset, ctx, tp_rank)


def match_rule(name: str, rules, offset: int, where: str):
    """The rule for Megatron parameter ``name`` and its ``{layer}`` value (global index)."""
    for pattern, rule in rules:
        match = pattern.match(name)
        if match:
            layer = {"layer": str(offset + int(match.group("layer")))} if "layer" in pattern.groupindex else {}
            return rule, layer
    raise DataError(where, None, f"no HF tensor maps to Megatron parameter '{name}'")


def _load_param(name, param, rules, reader, offset: int, ctx: Context, tp_rank: int) -> None:
    rule, layer = match_rule(name, rules, offset, reader.folder)
    full = rule.build(reader.get, layer, ctx)
    if getattr(param, "tensor_model_parallel", False):
        full = full.chunk(ctx.tp, dim=param.partition_dim)[tp_rank]
    if tuple(full.shape) != tuple(param.shape):
        sources = ", ".join(n.format(**layer) for n in rule.hf_names())
        raise DataError(reader.folder, None, f"shape mismatch for '{sources}' -> '{name}': expected "
                        f"{tuple(param.shape)} on this rank, found {tuple(full.shape)}")
    with torch.no_grad():
        param.copy_(full.to(param.dtype))
