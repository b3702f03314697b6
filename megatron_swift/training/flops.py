"""Model FLOPs per training step, the numerator of TFLOP/s and MFU.

Formula (stated so figures can be compared): per token and per layer, the
forward pass costs 2 FLOPs per multiply-accumulate of

* attention projections: ``h * (q + 2 * kv)`` for QKV and ``q * h`` for the output,
  with ``q = heads * head_dim`` and ``kv = query_groups * head_dim``;
* attention scores and weighted values: ``2 * s * q`` (full ``s x s``, the causal
  half is not subtracted, as in Megatron-LM's report);
* MLP: ``3 * h * f`` for SwiGLU (gate, up, down), or for an MoE layer
  ``topk * 3 * h * f_expert + h * experts`` (router) plus ``3 * h * f_shared`` for shared experts (and ``h``
  for their sigmoid gate); a model with dense layers among its MoE layers counts each layer as what it is;

(a family may count its own layers instead: models/families/deepseek.py's multi-head latent attention and
dense first layers), plus ``h * V`` for the output layer (``h`` for a reward model's scalar head). Training is 3x the forward (backward
costs twice the forward). Activation recompute is not counted: this is model
FLOPs, so MFU does not rise when recompute adds work.

A VLM adds, per image, its vision encoder over the image's patches (and class token): per layer ``4 * h_v^2``
for the projections, ``2 * T * h_v`` for scores and values, ``2 * h_v * f_v`` for the (ungated) MLP, per token;
3x when the encoder trains, 1x (forward only) when frozen; and the projector ``h_v * h + h * h`` per image token,
3x. Image tokens in the language model are ordinary positions of the row. A tower held as transformers' module
(Qwen2.5-VL, Qwen3-VL, InternVL) is counted by its family per image token, with attention over the image's own
patches where the data knows each image's token count (VLRows.image_sizes).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

from megatron_swift.models.arch import Arch


def flops_per_token(arch: Arch, seq_length: int, padded_vocab: int) -> float:
    """Training FLOPs (forward + backward) per token."""
    h = arch.hidden_size
    outputs = padded_vocab if arch.head == "lm" else 1
    layers = arch.decoder_family.layer_macs(arch, seq_length)  # a family's own layers (MLA, dense + MoE)
    if layers is not None:
        # Each MTP layer: its [embedding; hidden] projection, a layer like the last decoder layer (the family's
        # count of n layers less its count of n - 1), and the shared output head once more.
        fewer = arch.decoder_family.layer_macs(dataclasses.replace(arch, num_layers=arch.num_layers - 1), seq_length)
        mtp = arch.mtp_num_layers * (2 * h * h + layers - fewer + h * outputs)
        return 3 * 2 * (layers + h * outputs + mtp)
    q = arch.num_attention_heads * arch.kv_channels
    kv = arch.num_query_groups * arch.kv_channels
    attention = h * (q + 2 * kv) + q * h + 2 * seq_length * q
    dense = 3 * h * arch.ffn_hidden_size
    moe = 0
    if arch.is_moe:
        moe = arch.moe_router_topk * 3 * h * arch.moe_ffn_hidden_size + h * arch.num_experts
        if arch.moe_shared_ffn_hidden_size:
            moe += 3 * h * arch.moe_shared_ffn_hidden_size + (h if arch.moe_shared_expert_gate else 0)
    moe_layers = arch.moe_layers
    # Each multi-token-prediction layer: its [embedding; hidden] projection, a layer like the last decoder
    # layer, and the shared output head once more.
    last = moe if arch.is_moe and (arch.moe_layer_pattern is None or arch.moe_layer_pattern[-1]) else dense
    mtp = arch.mtp_num_layers * (2 * h * h + attention + last + h * outputs)
    forward_macs = (arch.num_layers * attention + moe_layers * moe + (arch.num_layers - moe_layers) * dense
                    + h * outputs + mtp)
    return 3 * 2 * forward_macs


def vision_flops_per_image(arch: Arch, train_vision: bool = False) -> float:
    """Training FLOPs of one image through a VLM's encoder and projector (0 for a text model)."""
    if arch.vision is None:
        return 0.0
    from megatron_swift.models.vision_arch import image_seq_length

    v, h = arch.vision, arch.hidden_size
    tokens = v.encoder_tokens
    layer = 4 * v.hidden_size ** 2 + 2 * tokens * v.hidden_size + 2 * v.hidden_size * v.ffn_hidden_size
    encoder = v.num_layers * layer * tokens
    projector = image_seq_length(v, arch.vision_select) * (v.hidden_size * h + h * h)
    return 2 * ((3 if train_vision else 1) * encoder + 3 * projector)


def flops_per_step(arch: Arch, seq_length: int, padded_vocab: int, global_batch_size: int,
                   images_per_row: float = 0.0, train_vision: bool = False,
                   image_tokens_per_row: float = 0.0, image_sizes: Optional[Dict[int, float]] = None) -> float:
    """Training FLOPs of one optimizer step over the whole global batch (``images_per_row``: a VLM's data's
    mean images per row; ``image_tokens_per_row``: its mean image tokens per row, which a held tower's
    native-resolution images vary: the family counts its tower per image token; ``image_sizes``: {image tokens:
    images of that many per row, on average}, which lets the family count attention over the whole image; the
    image tokens per row they do not cover (videos) are counted without it)."""
    text = flops_per_token(arch, seq_length, padded_vocab) * seq_length * global_batch_size
    if arch.vision_hf is not None:
        sizes = image_sizes or {}
        known = sum(tokens * count for tokens, count in sizes.items())
        tower = sum(tokens * count * arch.family.tower_flops_per_token(arch, train_vision, tokens)
                    for tokens, count in sizes.items())
        tower += arch.family.tower_flops_per_token(arch, train_vision) * max(0.0, image_tokens_per_row - known)
        return text + tower * global_batch_size
    return text + vision_flops_per_image(arch, train_vision) * images_per_row * global_batch_size
