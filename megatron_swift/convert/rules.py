"""Typed rules of a weight table: how one Megatron parameter is made from HF tensors.

Names carry a ``{layer}`` wildcard (global layer index). A rule's ``mcore`` is a
tuple of alternative Megatron names for the same tensor (local-spec and
Transformer-Engine-spec spellings differ for the fused norms).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

Fetch = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class Direct:
    """One HF tensor as it is; ``pad_vocab`` zero-pads rows up to the padded vocabulary."""

    mcore: Tuple[str, ...]
    hf: str
    pad_vocab: bool = False

    def hf_names(self):
        return (self.hf,)

    def build(self, fetch: Fetch, layer: Dict[str, str], ctx) -> torch.Tensor:
        tensor = fetch(self.hf.format(**layer))
        if self.pad_vocab and tensor.shape[0] < ctx.padded_vocab:
            pad = tensor.new_zeros((ctx.padded_vocab - tensor.shape[0],) + tuple(tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        return tensor

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        """Inverse of ``build``: the HF tensor (vocabulary padding removed)."""
        if self.pad_vocab:
            full = full[: ctx.vocab_size]
        return {self.hf.format(**layer): full}


@dataclass(frozen=True)
class QKV:
    """Q, K, V projections fused in Megatron's order: per query group, its queries then its key and value."""

    mcore: Tuple[str, ...]
    q: str
    k: str
    v: str

    def hf_names(self):
        return (self.q, self.k, self.v)

    def build(self, fetch: Fetch, layer: Dict[str, str], ctx) -> torch.Tensor:
        q, k, v = (fetch(n.format(**layer)) for n in (self.q, self.k, self.v))
        groups, d = ctx.num_query_groups, ctx.kv_channels
        rest = tuple(q.shape[1:])
        q = q.reshape(groups, -1, *rest)  # [groups, heads_per_group * d, ...]
        k = k.reshape(groups, d, *rest)
        v = v.reshape(groups, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        groups, d = ctx.num_query_groups, ctx.kv_channels
        rest = tuple(full.shape[1:])
        per_group = full.reshape(groups, -1, *rest)
        q_rows = per_group.shape[1] - 2 * d
        q, k, v = per_group.split([q_rows, d, d], dim=1)
        return {n.format(**layer): t.reshape(-1, *rest).contiguous() for n, t in ((self.q, q), (self.k, k), (self.v, v))}


@dataclass(frozen=True)
class GateUp:
    """SwiGLU gate and up projections fused as Megatron's linear_fc1.

    Megatron shards fc1 so that each TP rank holds [gate_r; up_r]; the full
    tensor is therefore the concatenation of those per-rank blocks, which an
    even split over TP ranks turns back into the right shards."""

    mcore: Tuple[str, ...]
    gate: str
    up: str

    def hf_names(self):
        return (self.gate, self.up)

    def build(self, fetch: Fetch, layer: Dict[str, str], ctx) -> torch.Tensor:
        gate, up = fetch(self.gate.format(**layer)), fetch(self.up.format(**layer))
        parts = [torch.cat([g, u]) for g, u in zip(gate.chunk(ctx.tp), up.chunk(ctx.tp))]
        return torch.cat(parts)

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        blocks = [b.chunk(2) for b in full.chunk(ctx.tp)]
        gate = torch.cat([g for g, _ in blocks])
        up = torch.cat([u for _, u in blocks])
        return {self.gate.format(**layer): gate.contiguous(), self.up.format(**layer): up.contiguous()}
