"""Packed rows on CUDA through PyTorch's variable-length flash attention (``torch.nn.attention.varlen``).

A packed row keeps its samples apart with a block-diagonal causal mask
(models.attention). SDPA with that mask cannot use the flash kernel: it runs
the memory-efficient kernel with the mask read as a bias, and its GQA support
stops there (K/V are repeated). The varlen flash kernel takes the samples'
boundaries instead (cu_seqlens) and attends causally inside each, with GQA.

The boundaries are read back from the mask the layer is given (a sample
starts where a position may not see its predecessor), once per mask and
shared by all layers, and the mask rebuilt from them must equal the given one:
any other mask (padding masks, masks from callers we do not know) is left to
SDPA. Used on CUDA in bf16/fp16 only, without attention dropout (the kernel has none).
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional, Tuple

import torch

_CACHE: list = [None, None]  # [mask the bounds were read from, (cu_seqlens, longest) or None]


@functools.lru_cache(maxsize=None)
def kernel():
    """PyTorch's varlen attention and its keyword parameters, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" not in params and "window_size" not in params:
        return None
    return varlen_attn, params


def bounds(mask: torch.Tensor) -> Optional[Tuple[torch.Tensor, int]]:
    """(cu_seqlens over the flattened rows as int32, longest sample) when ``mask`` ([b, 1, s, s], True =
    forbidden) is exactly block-diagonal causal; None otherwise. Cached for the mask last asked about."""
    if _CACHE[0] is mask:
        return _CACHE[1]
    b, s = mask.shape[0], mask.shape[-1]
    result = None
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == s and mask.dtype == torch.bool:
        i = torch.arange(1, s, device=mask.device)
        starts = torch.ones(b, s, dtype=torch.bool, device=mask.device)
        starts[:, 1:] = mask[:, 0, i, i - 1]
        segment = starts.cumsum(dim=1)
        causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
        expected = ~((segment[:, :, None] == segment[:, None, :]) & causal).unsqueeze(1)
        if torch.equal(expected, mask):
            first = torch.nonzero(starts.flatten()).flatten()
            cu = torch.cat([first, first.new_tensor([b * s])]).to(torch.int32)
            result = cu, int((cu[1:] - cu[:-1]).max())
    _CACHE[0], _CACHE[1] = mask, result
    return result


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
           scale: float) -> Optional[torch.Tensor]:
    """Attention of packed rows in megatron-core's layout (q [s, b, np, hn], k/v [s, b, ng, hn]) ->
    [s, b, np, hn]; None when the kernel or the mask does not fit (the caller uses SDPA)."""
    found = kernel()
    s, hn = query.shape[0], query.shape[-1]
    # The flash kernel's domain: half precision, head dims up to 256 in steps of 8, self-attention.
    if (found is None or not query.is_cuda or query.dtype not in (torch.bfloat16, torch.float16)
            or hn % 8 or hn > 256 or key.shape[0] != s or mask.shape[-1] != s):
        return None
    fn, params = found
    if "scale" not in params and abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        return None
    packed = bounds(mask)
    if packed is None:
        return None
    cu, longest = packed
    b, heads = query.shape[1], query.shape[2]
    kwargs = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "scale" in params:
        kwargs["scale"] = scale
    if key.shape[2] != heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key, value = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (key, value))
    # [s, b, h, d] -> [b * s, h, d]: a view when b == 1 (packed rows usually are one per micro-batch).
    q, k, v = (t.transpose(0, 1).reshape(b * s, t.shape[2], hn) for t in (query, key, value))
    out = fn(q, k, v, cu, cu, longest, longest, **kwargs)
    return out.reshape(b, s, heads, hn).transpose(0, 1)
