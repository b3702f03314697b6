"""Keys go into the KV cache already rotated: one rotary embedding per new token instead of one per cached key.

megatron-core 0.16's static inference caches keys *before* the rotary embedding and rotates the whole cache
again at every step (``k_pos_emb[:sequence_end]`` in ``Attention._adjust_key_value_for_inference``): the
work per new token grows with the length written so far. Its ``config.flash_decode`` path rotates the new
query and key with precomputed cos/sin and caches the rotated key, but takes the rotation from flash-attn
(``rope_utils.apply_rotary_emb_flash``), and without flash-attn its fallback passes cos/sin values where
angles are expected (wrong output; megatron-core 0.16.1). In decode mode the same flag also calls
flash-attn's decoding kernel, so the engine never switches the context to decode mode.

:func:`rotated_cache` turns ``flash_decode`` on for the duration of a generation and, where flash-attn is
absent, gives megatron-core the rotation in torch (:func:`rotate`: the same arithmetic as flash-attn's
kernel, non-interleaved and interleaved).
"""
from __future__ import annotations

import contextlib

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """flash-attn's ``apply_rotary_emb``: x [b, s, heads, d], cos/sin [s, r/2]; the first r features rotate.

    Written as ``x * cos' + swap(x) * sin'`` with cos/sin widened to r features (sin' carrying the signs): two
    multiplications and one addition over x instead of four and two (it runs twice per layer per token)."""
    r = 2 * cos.shape[-1]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    head = x[..., :r] if r < x.shape[-1] else x
    if interleaved:  # pairs (x[2i], x[2i+1]) rotate by angle i
        cos_r, sin_r = cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)
        swapped = head.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:  # halves (x[i], x[i + r/2]) rotate by angle i
        cos_r, sin_r = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
        half = r // 2
        swapped = torch.cat([head[..., half:], head[..., :half]], -1)
    out = head * cos_r + swapped * sin_r
    return out if head is x else torch.cat([out, x[..., r:]], dim=-1)


@contextlib.contextmanager
def rotated_cache(config):
    """``config.flash_decode`` on (and a torch rotation where flash-attn is missing) inside the block."""
    from megatron.core.models.common.embeddings import rope_utils

    flag, kernel = config.flash_decode, rope_utils.apply_rotary_emb_flash
    config.flash_decode = True
    if kernel is None:
        rope_utils.apply_rotary_emb_flash = rotate
    try:
        yield
    finally:
        config.flash_decode = flag
        rope_utils.apply_rotary_emb_flash = kernel
