"""Model FLOPs per training step, the numerator of TFLOP/s and MFU.

Formula (stated so figures can be compared): per token and per layer, the
forward pass costs 2 FLOPs per multiply-accumulate of

* attention projections: ``h * (q + 2 * kv)`` for QKV and ``q * h`` for the output,
  with ``q = heads * head_dim`` and ``kv = query_groups * head_dim``;
* attention scores and weighted values: ``2 * s * q`` (full ``s x s``, the causal
  half is not subtracted, as in Megatron-LM's report);
* MLP: ``3 * h * f`` for SwiGLU (gate, up, down), or for MoE
  ``topk * 3 * h * f_expert + h * experts`` (router);

plus ``h * V`` for the output layer (``h`` for a reward model's scalar head). Training is 3x the forward (backward
costs twice the forward). Activation recompute is not counted: this is model
FLOPs, so MFU does not rise when recompute adds work.
"""
from __future__ import annotations

from megatron_swift.models.arch import Arch


def flops_per_token(arch: Arch, seq_length: int, padded_vocab: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    h = arch.hidden_size
    q = arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    attention = h * (q + 2 * kv) + q * h + 2 * seq_length * q
    if arch.is_moe:
        mlp = arch.moe_router_topk * 3 * h * arch.moe_ffn_hidden_size + h * arch.num_experts
    else:
        mlp = 3 * h * arch.ffn_hidden_size
    outputs = padded_vocab if arch.head == "lm" else 1
    forward_macs = arch.num_layers * (attention + mlp) + h * outputs
    return 3 * 2 * forward_macs


def flops_per_step(arch: Arch, seq_length: int, padded_vocab: int, global_batch_size: int) -> float:
    """Training FLOPs of one optimizer step over the whole global batch."""
    return flops_per_token(arch, seq_length, padded_vocab) * seq_length * global_batch_size
