"""Workaround for megatron-core 0.16.1's multi-latent attention (MLA) under tensor parallelism without Transformer
Engine: the gradient of the shared rotary key is summed over one TP rank's heads only.

Without TE, MLA's ``linear_kv_down_proj`` is a ColumnParallelLinear: each TP rank computes a slice of the
``[kv_lora_rank | qk_pos_emb_head_dim]`` output, and ``get_query_key_value_tensors`` gathers the slices
(``gather_from_tensor_model_parallel_region``: forward all-gather, backward keep this rank's slice). The latent
part's gradient comes back whole on every rank (``linear_kv_up_proj`` reduces it), but the rotary key
``k_pos_emb`` is shared by all heads and each rank uses it for its own heads only: its gradient on a rank is that
rank's heads' part, and the backward keeps the part of the rank that holds those columns and drops the others.
Measured (DeepSeek-V3-style model of tests/multiproc/test_layout_parity.py, TP=2 + SP against one rank): the
rotary rows of ``linear_kv_down_proj``'s gradient were off by as much as their own size, the grad norm by 4e-6
relative at step 1 and 3.5e-5 at step 2; with this, every gradient is within 3e-8 (also V2-style direct queries,
and TP=2 without SP). TE's path (``TELinear``, duplicated) gathers ``k_pos_emb`` over the
sequence, whose backward sums over TP, and is not changed here.

Here the kv gather's backward sums the rotary columns over the TP group before keeping this rank's slice; the
latent columns, already whole, are kept as they are. Installed once, for every MLA module of the process.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region


class _GatherSumRope(torch.autograd.Function):
    """Forward: all-gather the last dim over TP. Backward: all-reduce the last ``rope`` columns (each rank holds
    its heads' part of their gradient), then keep this rank's slice."""

    @staticmethod
    def forward(ctx, shard, rope: int, group):
        ctx.rope, ctx.group = rope, group
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        rope = grad[..., -ctx.rope:].contiguous()
        dist.all_reduce(rope, group=ctx.group)
        whole = torch.cat([grad[..., :-ctx.rope], rope], dim=-1)
        mine = whole.chunk(dist.get_world_size(ctx.group), dim=-1)[dist.get_rank(ctx.group)]
        return mine.contiguous(), None, None


def install() -> None:
    """Wrap MLASelfAttention.get_query_key_value_tensors (once): while it runs on a module whose kv
    down-projection is column-parallel over more than one rank, its kv gather is :class:`_GatherSumRope`."""
    from megatron.core.transformer import multi_latent_attention as mla

    original = mla.MLASelfAttention.get_query_key_value_tensors
    if getattr(original, "_sums_rope_grad", False):
        return

    @functools.wraps(original)
    def get_query_key_value_tensors(self, *args, **kwargs):
        group = ps.get_tensor_model_parallel_group()
        if not isinstance(self.linear_kv_down_proj, ColumnParallelLinear) or dist.get_world_size(group) == 1:
            return original(self, *args, **kwargs)
        # megatron-core 0.16.1 gathers the query latent first (when q_lora_rank is set), then the kv one.
        kv_call, calls = (2 if self.config.q_lora_rank is not None else 1), []
        width = self.config.kv_lora_rank + self.config.qk_pos_emb_head_dim

        def gather(shard, group=None):
            calls.append(shard)
            if len(calls) != kv_call:
                return gather_from_tensor_model_parallel_region(shard, group)
            assert shard.size(-1) * dist.get_world_size(ps.get_tensor_model_parallel_group()) == width
            return _GatherSumRope.apply(shard, self.config.qk_pos_emb_head_dim,
                                        group or ps.get_tensor_model_parallel_group())

        saved = mla.gather_from_tensor_model_parallel_region
        mla.gather_from_tensor_model_parallel_region = gather
        try:
            return original(self, *args, **kwargs)
        finally:
            mla.gather_from_tensor_model_parallel_region = saved

    get_query_key_value_tensors._sums_rope_grad = True
    mla.MLASelfAttention.get_query_key_value_tensors = get_query_key_value_tensors
