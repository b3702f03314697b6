"""The attention seam: which kernel runs core attention, and the inputs packed rows give it.

``model.attention_backend`` (resolved once by :func:`resolve`):

- ``te``: Transformer Engine's attention (fused kernels, THD packing, context
  parallelism); the rest of the layer is TE too.
- ``sdpa``: models.sdpa, PyTorch's fused scaled-dot-product kernels behind
  megatron-core's core-attention interface; the default when TE is not there.
- ``local``: megatron-core's own DotProductAttention (explicit ``s x s`` scores),
  kept as the reference the others are tested against.

:func:`use_core_attention` puts the chosen module into a layer spec (the
linears and norms around it follow the device: TE specs when TE imports);
nothing else in the project branches on the attention backend. Context parallelism plugs in
here too: ``parallel.cp_comm=a2a`` (Ulysses) wraps the chosen module (models.ulysses); TE's ring
modes (p2p, a2a+p2p, allgather) are TE's own.

Packed rows: ``segments`` ([b, s], sample number per position, -1 for padding)
becomes either a block-diagonal causal mask (``mask``: True where attention is
forbidden, megatron-core's convention; sdpa and local) or THD PackedSeqParams
with one cu_seqlens entry per sample (``thd``: TE; one row per micro-batch,
which config validation ensures).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

BACKENDS = ("auto", "te", "sdpa", "local")


def resolve(requested: str, te_available: bool) -> str:
    """``auto`` is TE when it imports (on CUDA), else sdpa; an explicit choice stays (validation checks it)."""
    if requested == "auto":
        return "te" if te_available else "sdpa"
    return requested


def packed_format(backend: str) -> str:
    """How packed rows keep samples apart under this attention backend: ``thd`` or ``mask``."""
    return "thd" if backend == "te" else "mask"


def core_attention_class(backend: str):
    """The megatron-core core-attention module of a backend."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    if backend == "sdpa":
        from megatron_swift.models.sdpa import SDPAttention

        return SDPAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention


def use_core_attention(block_spec, backend: str, cp: int = 1) -> None:
    """Put the backend's core attention into every layer of a block spec, in place. With context
    parallelism (cp > 1) outside TE, Ulysses (models.ulysses) wraps it: TE runs its own CP modes."""
    cls = core_attention_class(backend)
    if cp > 1 and backend != "te":
        from megatron_swift.models.ulysses import ulysses_class

        cls = ulysses_class(cls)
    for layer in getattr(block_spec, "layer_specs", [block_spec]):
        attention = getattr(layer.submodules.self_attention, "submodules", None)
        if attention is not None and dataclasses.is_dataclass(attention) and hasattr(attention, "core_attention"):
            attention.core_attention = cls


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
