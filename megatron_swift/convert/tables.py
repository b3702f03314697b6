"""Weight tables of the Llama-style decoders (Llama, Mistral, Qwen2, Qwen3), built from named options."""
from __future__ import annotations

from typing import List

from megatron_swift.convert.rules import QKV, Direct, GateUp

_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."


def llama_style(qk_norm: bool = False, qkv_bias: bool = False, tied: bool = False) -> List[object]:
    """Rules for one dense Llama-style decoder; ``tied`` feeds the output layer from the embedding."""
    rules = [
        Direct(("embedding.word_embeddings.weight",), "model.embed_tokens.weight", pad_vocab=True),
        Direct((_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight"),
               _H + "input_layernorm.weight"),
        QKV((_L + "self_attention.linear_qkv.weight",),
            _H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        Direct((_L + "self_attention.linear_proj.weight",), _H + "self_attn.o_proj.weight"),
        Direct((_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight"),
               _H + "post_attention_layernorm.weight"),
        GateUp((_L + "mlp.linear_fc1.weight",), _H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        Direct((_L + "mlp.linear_fc2.weight",), _H + "mlp.down_proj.weight"),
        Direct(("decoder.final_layernorm.weight",), "model.norm.weight"),
        # Tied models still hold a copy of the embedding on the last pipeline stage.
        Direct(("output_layer.weight",), "model.embed_tokens.weight" if tied else "lm_head.weight", pad_vocab=True),
    ]
    if qk_norm:
        rules += [
            Direct((_L + "self_attention.q_layernorm.weight",), _H + "self_attn.q_norm.weight"),
            Direct((_L + "self_attention.k_layernorm.weight",), _H + "self_attn.k_norm.weight"),
        ]
    if qkv_bias:
        rules.append(QKV((_L + "self_attention.linear_qkv.bias",),
                         _H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"))
    return rules
