"""Qwen3-VL-MoE (HF ``Qwen3VLMoeForConditionalGeneration``): families/qwen3_vl.py's model (the same held vision
tower, DeepStack and interleaved M-RoPE) over a Qwen3-MoE language model on megatron-core's MoE layer
(families/qwen3_moe.py: its config keys, router mapping and layer pattern; expert parallelism as there).

transformers' MoE block here is a softmax router whose top-k weights are always renormalised (megatron-core
``moe_router_pre_softmax=False``) and SwiGLU experts without biases or a shared expert, all of which
megatron-core 0.16.1 builds. Its checkpoints stack a layer's experts in two tensors (``experts.gate_up_proj``,
``experts.down_proj``), which convert/rules.StackedExperts reads in either the transformers 5 or the
published (transformers 4.57, transposed) layout and writes in the transformers 5 one.
"""
from __future__ import annotations

import dataclasses

from megatron_swift.convert import hf_config as hc
from megatron_swift.models.families.qwen2_5_vl import QwenVLSize
from megatron_swift.models.families.qwen3_vl import _LARGE_TOWER, _Q, Qwen3VLFamily
from megatron_swift.models.families.qwen3_vl import FAMILY as DENSE


def _read(text: dict, where: str) -> dict:
    """The text_config keys of this MoE block beyond Qwen3-MoE's (families/qwen3_moe.py reads those)."""
    hc.check_keys(text, where, {"norm_topk_prob": (bool, "transformers' Qwen3-VL-MoE router always renormalises "
                                                         "the top-k weights; set text_config.norm_topk_prob=true")})
    return {"moe_router_pre_softmax": False}


_MOE = dict(_Q, text_family="qwen3_moe")


def _tower(vision: dict, out: int) -> dict:
    """Qwen3-VL's tower config as transformers 5 writes it for this model (its own vision model_type)."""
    return dict(vision, out_hidden_size=out, model_type="qwen3_vl_moe_vision")

FAMILY = Qwen3VLFamily(
    name="qwen3_vl_moe",
    hf_architectures=("Qwen3VLMoeForConditionalGeneration",),
    hf_model_type="qwen3_vl_moe",
    moe=True,
    layers_prefix=DENSE.layers_prefix,
    hf_read=_read,
    text_family="qwen3_moe",
    hf_classes="Qwen3VLMoe",
    hf_text_type="qwen3_vl_moe_text",
    sizes={
        # CPU-sized: qwen3_vl's tiny model with 4 routed experts (top 2, 24 wide) in layers 0-2 and a dense MLP
        # in layer 3 (mlp_only_layers).
        "tiny": dataclasses.replace(DENSE.sizes["tiny"], text_family="qwen3_moe", num_experts=4,
                                    moe_ffn_hidden_size=24, moe_router_topk=2, moe_dense_layers=(3,),
                                    vision_hf=_tower(DENSE.sizes["tiny"].vision_hf, 64)),
        # Qwen/Qwen3-VL-30B-A3B-Instruct config.json (text_config: 48 layers, 2048 wide, 32/4 heads, 128 experts
        # of 768, top 8, norm_topk_prob true; the 27-block tower with DeepStack at 8, 16, 24).
        "30b-a3b": QwenVLSize(48, 2048, 6144, 32, 4, num_experts=128, moe_ffn_hidden_size=768, moe_router_topk=8,
                              vision_hf=_tower(_LARGE_TOWER, 2048), **_MOE),
        # Qwen/Qwen3-VL-235B-A22B-Instruct: 94 layers, 4096 wide, 64/4 heads, 128 experts of 1536, top 8.
        "235b-a22b": QwenVLSize(94, 4096, 12288, 64, 4, num_experts=128, moe_ffn_hidden_size=1536,
                                moe_router_topk=8, vision_hf=_tower(_LARGE_TOWER, 4096), **_MOE),
    },
)
