"""Ulysses context parallelism (``parallel.cp_comm=a2a``) around any core attention.

Each rank of a context-parallel group holds a part of the sequence (training.cp_shard: megatron-core's
load-balanced split into 2 x cp chunks, rank r keeping chunks r and 2cp-1-r, which is also how
megatron-core slices the rotary embeddings). Attention needs the whole sequence, so:

1. all-to-all (sequence -> heads): every rank sends each peer the peer's share of its heads and gets
   the whole sequence for its own share, ``[s/cp, b, h, d] -> [s, b, h/cp, d]``;
2. the core attention chosen by the attention seam (sdpa, local) runs on the whole sequence for
   those heads, with the full causal or packed-row mask;
3. all-to-all back (heads -> sequence).

Both exchanges are autograd functions whose backward is the opposite exchange. The chunks arrive in
rank order (chunk 0, chunk 2cp-1, chunk 1, ...), so they are put in sequence order before attention
and back after. When the query groups of a TP rank are fewer than cp, K/V heads are repeated until
each CP rank has the group its query heads read (config validation says when it does this).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


def _exchange(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """all-to-all: split ``scatter_dim`` into cp parts (part j goes to rank j), concatenate what comes
    back along ``gather_dim`` in rank order."""
    cp = dist.get_world_size(group)
    parts = x.movedim(scatter_dim, 0)
    parts = parts.reshape(cp, parts.shape[0] // cp, *parts.shape[1:]).contiguous()
    received = torch.empty_like(parts)
    dist.all_to_all_single(received, parts, group=group)
    # received[j] is rank j's piece: move the rank index next to gather_dim and merge the two.
    received = received.movedim(1, scatter_dim + 1)  # [cp, ..., scatter part, ...] in x's layout
    received = received.movedim(0, gather_dim)
    shape = list(received.shape)
    shape[gather_dim:gather_dim + 2] = [shape[gather_dim] * shape[gather_dim + 1]]
    return received.reshape(shape)


class _Exchange(torch.autograd.Function):
    """:func:`_exchange` as an autograd function: its backward is the opposite exchange."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim: int, gather_dim: int):
        ctx.group, ctx.dims = group, (scatter_dim, gather_dim)
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad, ctx.group, scatter_dim=gather_dim, gather_dim=scatter_dim), None, None, None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[s/cp, b, h, d] -> [s, b, h/cp, d] (sequence pieces in rank order)."""
    return _Exchange.apply(x, group, 2, 0)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[s, b, h/cp, d] -> [s/cp, b, h, d]."""
    return _Exchange.apply(x, group, 0, 2)


@functools.lru_cache(maxsize=None)
def _orders(seq: int, cp: int, device):
    """(to_sequence, to_ranks): index_select orders between the gathered layout, where rank r's piece
    is chunks r and 2cp-1-r of the sequence's 2cp chunks, and sequence order."""
    chunk = seq // (2 * cp)
    ranks = [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]
    to_ranks = torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in ranks])  # gathered i -> position
    return torch.argsort(to_ranks).to(device), to_ranks.to(device)


def split_problem(heads_per_tp: int, groups_per_tp: int, cp: int) -> Optional[str]:
    """Why a TP rank's heads cannot be split over cp ranks ("heads" or "groups"), None when they can: the
    query heads must divide by cp, and the query groups divide by cp or divide it (K/V then repeated)."""
    if heads_per_tp % cp:
        return "heads"
    if groups_per_tp % cp and cp % groups_per_tp:
        return "groups"
    return None


def kv_repeats(groups_per_tp: int, cp: int) -> int:
    """How many times each K/V head is repeated so that cp divides the groups of a TP rank."""
    return 1 if groups_per_tp % cp == 0 else divide(cp, groups_per_tp)


class UlyssesAttention(MegatronModule):
    """Core attention over the whole sequence for this rank's heads; the inner class is ``inner_class``."""

    inner_class = None  # set by ulysses_class

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        tp, cp = config.tensor_model_parallel_size, config.context_parallel_size
        self.group = ps.get_context_parallel_group()
        self.cp = cp
        self.repeats = kv_repeats(divide(config.num_query_groups, tp), cp)
        groups = config.num_query_groups * self.repeats
        # The inner module sees heads/cp and groups/cp of this TP rank, and no context parallelism.
        inner = dataclasses.replace(config, num_attention_heads=divide(config.num_attention_heads, cp),
                                    num_query_groups=divide(groups, cp), context_parallel_size=1)
        self.inner = self.inner_class(inner, layer_number, attn_mask_type, attention_type,
                                      attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                                      pg_collection=pg_collection)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None, "packed THD input needs model.attention_backend=te"
        if self.repeats > 1:
            key, value = (t.repeat_interleave(self.repeats, dim=2) for t in (key, value))
        q, k, v = (seq_to_heads(t, self.group) for t in (query, key, value))
        to_sequence, to_ranks = _orders(q.shape[0], self.cp, q.device)
        q, k, v = (t.index_select(0, to_sequence) for t in (q, k, v))
        context = self.inner(q, k, v, attention_mask, attn_mask_type=attn_mask_type,
                             attention_bias=attention_bias)
        s, b = context.shape[0], context.shape[1]
        context = context.index_select(0, to_ranks).reshape(s, b, q.shape[2], -1)
        context = heads_to_seq(context, self.group)
        return context.reshape(context.shape[0], b, -1)


@functools.lru_cache(maxsize=None)
def ulysses_class(inner_class):
    """A layer-spec class: Ulysses around ``inner_class`` (megatron-core builds spec modules from classes)."""
    return type(f"Ulysses{inner_class.__name__}", (UlyssesAttention,), {"inner_class": inner_class})
