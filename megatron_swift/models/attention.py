"""Attention inputs for packed rows: keep each sample to itself, in the form the backend's attention takes.

``segments`` ([b, s], sample number per position, -1 for padding) becomes
either a block-diagonal causal mask (``mask``: True where attention is
forbidden, megatron-core's convention) or THD PackedSeqParams with one
cu_seqlens entry per sample (``thd``: Transformer Engine; one row per
micro-batch, which config validation ensures).
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool: position i may attend to j <= i of its own sample only."""
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return ~(same & causal).unsqueeze(1)


def thd_params(segments: torch.Tensor) -> PackedSeqParams:
    """cu_seqlens over the one row: a new sequence wherever the segment id changes (padding is its own)."""
    if segments.shape[0] != 1:
        raise ValueError("THD packing takes one row per micro-batch (train.micro_batch_size=1)")
    row = segments[0]
    starts = torch.nonzero(row[1:] != row[:-1]).flatten() + 1
    zero = torch.zeros(1, dtype=starts.dtype, device=row.device)
    end = torch.full((1,), row.numel(), dtype=starts.dtype, device=row.device)
    cu = torch.cat([zero, starts, end]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def attention_inputs(segments: Optional[torch.Tensor], packed_format: str) -> dict:
    """Keyword arguments for GPTModel.forward: attention_mask and, for THD, packed_seq_params."""
    if segments is None:
        return {"attention_mask": None}
    if packed_format == "thd":
        return {"attention_mask": None, "packed_seq_params": thd_params(segments)}
    return {"attention_mask": block_causal_mask(segments)}
