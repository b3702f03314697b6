"""Weight tables (HF name <-> Megatron name) of the Llama-style decoders, assembled from named parts.

Llama, Mistral, Qwen2 and Qwen3 are ``llama_style`` with options; Qwen3-MoE, Mixtral, Qwen2-MoE and GLM-4.5
are ``moe_style`` with options: the same embedding and attention with routed experts (and shared experts,
dense layers) as the MLP. OLMo 2 (norms after attention and MLP) and Phi-3 (fused HF projections) have their own.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from megatron_swift.convert.rules import (QKV, Direct, FusedGateUp, FusedQKV, GateUp, Reshape, StackedExperts,
                                         SwapHalves)

_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."


def _embedding(tied: bool, head: str) -> List[object]:
    rules = [
        Direct(("embedding.word_embeddings.weight",), "model.embed_tokens.weight", pad_vocab=True),
        Direct(("decoder.final_layernorm.weight",), "model.norm.weight"),
    ]
    if head == "reward":  # *ForSequenceClassification with one label: its own [1, hidden] weight
        return rules + [Direct(("output_layer.weight",), "score.weight")]
    # Tied models still hold a copy of the embedding on the last pipeline stage.
    return rules + [Direct(("output_layer.weight",), "model.embed_tokens.weight" if tied else "lm_head.weight",
                           pad_vocab=True)]


def _attention(qk_norm: bool, qkv_bias: bool) -> List[object]:
    rules = [
        Direct((_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight"),
               _H + "input_layernorm.weight"),
        QKV((_L + "self_attention.linear_qkv.weight",),
            _H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
        Direct((_L + "self_attention.linear_proj.weight",), _H + "self_attn.o_proj.weight"),
        Direct((_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight"),
               _H + "post_attention_layernorm.weight"),
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


def _dense_mlp() -> List[object]:
    return [
        GateUp((_L + "mlp.linear_fc1.weight",), _H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
        Direct((_L + "mlp.linear_fc2.weight",), _H + "mlp.down_proj.weight"),
    ]


def _routed_experts(mlp: str = "mlp.", names=("gate_proj", "up_proj", "down_proj"),
                    expert_bias: bool = False, stacked: Optional[Tuple[int, int]] = None) -> List[object]:
    """Router and routed experts; ``mlp``: the HF module holding them (Mixtral: block_sparse_moe.), ``names``:
    each expert's gate, up and down projections; ``expert_bias``: the router's selection bias; ``stacked``:
    (experts, hidden size) when the HF checkpoint holds a layer's experts as two stacked tensors
    (``experts.gate_up_proj``, ``experts.down_proj``: rules.StackedExperts), not one module per expert."""
    # Megatron keeps one weight per expert: SequentialMLP (local spec) names it
    # local_experts.{i}.linear_fc1.weight, TEGroupedMLP linear_fc1.weight{i}; {expert} is global.
    seq, grouped = _L + "mlp.experts.local_experts.{expert}.", _L + "mlp.experts."
    hf = _H + mlp + "experts.{expert}."
    gate, up, down = names
    fc1 = (seq + "linear_fc1.weight", grouped + "linear_fc1.weight{expert}")
    fc2 = (seq + "linear_fc2.weight", grouped + "linear_fc2.weight{expert}")
    rules = [Direct((_L + "mlp.router.weight",), _H + mlp + "gate.weight")]
    if stacked:
        experts, hidden = stacked
        rules += [StackedExperts(fc1, _H + mlp + "experts.gate_up_proj", experts, hidden, gate_up=True),
                  StackedExperts(fc2, _H + mlp + "experts.down_proj", experts, hidden)]
    else:
        rules += [GateUp(fc1, hf + f"{gate}.weight", hf + f"{up}.weight"), Direct(fc2, hf + f"{down}.weight")]
    if expert_bias:  # a float32 buffer of the router (megatron-core keeps it in float32)
        rules.append(Direct((_L + "mlp.router.expert_bias",), _H + mlp + "gate.e_score_correction_bias", fp32=True))
    return rules


def _shared_experts(hf_name: str, gate: bool) -> List[object]:
    """The shared expert(s) every token goes through, HF ``mlp.<hf_name>``; ``gate``: scaled by a sigmoid
    of one linear (HF ``mlp.shared_expert_gate``)."""
    m, hf = _L + "mlp.shared_experts.", _H + f"mlp.{hf_name}."
    rules = [GateUp((m + "linear_fc1.weight",), hf + "gate_proj.weight", hf + "up_proj.weight"),
             Direct((m + "linear_fc2.weight",), hf + "down_proj.weight")]
    if gate:
        rules.append(Direct((m + "gate_weight",), _H + "mlp.shared_expert_gate.weight"))
    return rules


def llama_style(qk_norm: bool = False, qkv_bias: bool = False, tied: bool = False, head: str = "lm") -> List[object]:
    """Rules for one dense Llama-style decoder; ``tied`` feeds the output layer from the embedding;
    ``head="reward"``: the output layer is a reward model's score."""
    return _embedding(tied, head) + _attention(qk_norm, qkv_bias) + _dense_mlp()


def moe_style(qk_norm: bool = False, qkv_bias: bool = False, tied: bool = False, head: str = "lm",
              mlp: str = "mlp.", expert_names=("gate_proj", "up_proj", "down_proj"), expert_bias: bool = False,
              shared: Optional[str] = None, shared_gate: bool = False,
              stacked_experts: Optional[Tuple[int, int]] = None) -> List[object]:
    """Rules for a decoder whose MLPs are a router plus routed SwiGLU experts (Qwen3-MoE), some layers
    perhaps dense (their rules match only where a layer has a dense MLP); options as in _routed_experts and
    _shared_experts (``shared``: the HF name of the shared expert module, None: there is none)."""
    rules = _embedding(tied, head) + _attention(qk_norm, qkv_bias) + _dense_mlp()
    rules += _routed_experts(mlp, expert_names, expert_bias, stacked_experts)
    return rules + (_shared_experts(shared, shared_gate) if shared else [])


def olmo2_style(tied: bool = False, head: str = "lm") -> List[object]:
    """OLMo 2: no norm before attention or MLP; RMSNorm on their outputs (models/post_norm.py's
    post_self_attn_layernorm / post_mlp_layernorm) and on the whole query and key projections (its q/k norm
    weights are as wide as the projections, split over TP with the heads)."""
    a = _L + "self_attention."
    return _embedding(tied, head) + [
        QKV((a + "linear_qkv.weight",), _H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight",
            _H + "self_attn.v_proj.weight"),
        Direct((a + "linear_proj.weight",), _H + "self_attn.o_proj.weight"),
        Direct((a + "q_layernorm.weight",), _H + "self_attn.q_norm.weight"),
        Direct((a + "k_layernorm.weight",), _H + "self_attn.k_norm.weight"),
        Direct((_L + "post_self_attn_layernorm.weight",), _H + "post_attention_layernorm.weight"),
        Direct((_L + "post_mlp_layernorm.weight",), _H + "post_feedforward_layernorm.weight"),
    ] + _dense_mlp()


def phi3_style(tied: bool = False, head: str = "lm") -> List[object]:
    """Phi-3 / Phi-4: a Llama-style decoder whose HF checkpoint fuses q, k and v into ``qkv_proj`` (all queries,
    then keys, then values) and gate and up into ``gate_up_proj``."""
    return _embedding(tied, head) + [
        Direct((_L + "input_layernorm.weight", _L + "self_attention.linear_qkv.layer_norm_weight"),
               _H + "input_layernorm.weight"),
        FusedQKV((_L + "self_attention.linear_qkv.weight",), _H + "self_attn.qkv_proj.weight"),
        Direct((_L + "self_attention.linear_proj.weight",), _H + "self_attn.o_proj.weight"),
        Direct((_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight"),
               _H + "post_attention_layernorm.weight"),
        FusedGateUp((_L + "mlp.linear_fc1.weight",), _H + "mlp.gate_up_proj.weight"),
        Direct((_L + "mlp.linear_fc2.weight",), _H + "mlp.down_proj.weight"),
    ]


def _mla(q_lora: bool) -> List[object]:
    """Multi-head latent attention (megatron-core MLASelfAttention; local-spec and TE-spec norm names).

    Megatron and HF lay the projections out alike (per head: no-RoPE then RoPE query rows; per head: key then
    value rows of the KV up-projection; the latent then the shared RoPE key of the KV down-projection), and
    megatron-core's MLA rotates DeepSeek's interleaved RoPE features itself, so every tensor maps directly."""
    a, h = _L + "self_attention.", _H + "self_attn."
    rules = [
        Direct((_L + "input_layernorm.weight",), _H + "input_layernorm.weight"),
        Direct((a + "linear_kv_down_proj.weight",), h + "kv_a_proj_with_mqa.weight"),
        Direct((a + "kv_layernorm.weight", a + "linear_kv_up_proj.layer_norm_weight"), h + "kv_a_layernorm.weight"),
        Direct((a + "linear_kv_up_proj.weight",), h + "kv_b_proj.weight"),
        Direct((a + "linear_proj.weight",), h + "o_proj.weight"),
        Direct((_L + "pre_mlp_layernorm.weight", _L + "mlp.linear_fc1.layer_norm_weight"),
               _H + "post_attention_layernorm.weight"),
    ]
    if q_lora:
        return rules + [
            Direct((a + "linear_q_down_proj.weight",), h + "q_a_proj.weight"),
            Direct((a + "q_layernorm.weight", a + "linear_q_up_proj.layer_norm_weight"), h + "q_a_layernorm.weight"),
            Direct((a + "linear_q_up_proj.weight",), h + "q_b_proj.weight"),
        ]
    return rules + [Direct((a + "linear_q_proj.weight",), h + "q_proj.weight")]


def _shared_experts_and_bias() -> List[object]:
    """DeepSeek's shared experts (one SwiGLU MLP, tensor-parallel like a dense one) and the router's score
    correction bias (megatron-core's expert_bias buffer)."""
    m, h = _L + "mlp.shared_experts.", _H + "mlp.shared_experts."
    return [
        GateUp((m + "linear_fc1.weight",), h + "gate_proj.weight", h + "up_proj.weight"),
        Direct((m + "linear_fc2.weight",), h + "down_proj.weight"),
        Direct((_L + "mlp.router.expert_bias",), _H + "mlp.gate.e_score_correction_bias"),
    ]


def deepseek_style(q_lora: bool = True, tied: bool = False, head: str = "lm") -> List[object]:
    """Rules for DeepSeek-V2/V3: MLA, dense MLPs in the first layers, routed plus shared experts after."""
    return (_embedding(tied, head) + _mla(q_lora) + _dense_mlp() + _routed_experts()
            + _shared_experts_and_bias())


def relayered(rules: List[object], mcore: str, hf: str) -> List[object]:
    """The decoder-layer rules of ``rules`` for one more layer under fixed names (no ``{layer}``): Megatron's
    ``decoder.layers.{layer}.`` becomes ``mcore``, HF's ``model.layers.{layer}.`` becomes ``hf``; rules of
    no decoder layer (embedding, final norm) are left out."""
    out = []
    for rule in rules:
        if not all(name.startswith(_L) for name in rule.mcore):
            continue
        changes = {f.name: (tuple(mcore + n[len(_L):] for n in rule.mcore) if f.name == "mcore"
                            else hf + value[len(_H):] if value.startswith(_H) else value)
                   for f in dataclasses.fields(rule) for value in [getattr(rule, f.name)]
                   if f.name == "mcore" or isinstance(value, str)}
        out.append(dataclasses.replace(rule, **changes))
    return out


def mtp_part(count: int, layer_rules: List[object], hf_layer, names: dict) -> List[object]:
    """Multi-token-prediction layers as megatron-core's MultiTokenPredictionBlock holds them
    (``mtp.layers.{i}.``: enorm, hnorm, eh_proj, one transformer layer, final_layernorm).

    ``layer_rules``: the decoder's rules (its layer rules are reused for the MTP transformer layer, which
    megatron-core builds from the last decoder layer's spec); ``hf_layer(i)``: the HF prefix of MTP layer i
    (MiMo ``model.mtp_layers.{i}.``, DeepSeek-V3 / GLM-4.5 ``model.layers.{N + i}.``); ``names``: the HF names of
    enorm, hnorm, eh_proj and final_layernorm under it, and ``swap`` true where the HF projection takes
    [hidden; embedding] (MiMo) rather than megatron-core's [embedding; hidden]."""
    rules = []
    for i in range(count):
        m, h = f"mtp.layers.{i}.", hf_layer(i)
        proj = SwapHalves if names.get("swap") else Direct
        rules += relayered(layer_rules, m + "transformer_layer.", h)
        rules += [Direct((m + "enorm.weight",), h + names["enorm"]), Direct((m + "hnorm.weight",), h + names["hnorm"]),
                  proj((m + "eh_proj.weight",), h + names["eh_proj"]),
                  Direct((m + "final_layernorm.weight",), h + names["final_layernorm"])]
    return rules


MIMO_MTP = dict(enorm="token_layernorm.weight", hnorm="hidden_layernorm.weight", eh_proj="input_proj.weight",
                final_layernorm="final_layernorm.weight", swap=True)


# DeepSeek-V3 and GLM-4.5 store MTP layer i as model.layers.{N + i}: the decoder layer's tensors plus these (and
# embed_tokens / shared_head.head, copies of the model's embedding and output head: families declare them unused).
NEXTN_MTP = dict(enorm="enorm.weight", hnorm="hnorm.weight", eh_proj="eh_proj.weight",
                 final_layernorm="shared_head.norm.weight")


def mimo_style(mtp_layers: int = 0, tied: bool = False, head: str = "lm") -> List[object]:
    """MiMo: the Qwen2 decoder (QKV bias) plus ``mtp_layers`` MTP layers stored as ``model.mtp_layers.{i}.``."""
    rules = llama_style(qkv_bias=True, tied=tied, head=head)
    return rules + mtp_part(mtp_layers, rules, lambda i: f"model.mtp_layers.{i}.", MIMO_MTP)


def vit_style(model_type: str, hf_prefix: str = "vision_model.") -> List[object]:
    """Rules for a CLIP or SigLIP vision encoder as megatron-core's CLIPViTModel (models/vision.py) holds it.

    ``hf_prefix``: where the encoder sits in the HF checkpoint (hf_load.load_vision_weights finds it). Q/K/V
    fuse per head (as many groups as heads: Context.num_query_groups)."""
    e, h, m = hf_prefix + "embeddings.", hf_prefix + "encoder.layers.{layer}.", "decoder.layers.{layer}."
    rules = [Direct(("conv1.weight",), e + "patch_embedding.weight"),
             Direct(("position_embeddings.weight",), e + "position_embedding.weight")]
    if model_type == "clip":  # a class token and a layernorm before the encoder (HF's spelling: pre_layrnorm)
        rules += [Reshape(("class_token",), e + "class_embedding", (1, 1, -1)),
                  Direct(("ln_pre.weight",), hf_prefix + "pre_layrnorm.weight"),
                  Direct(("ln_pre.bias",), hf_prefix + "pre_layrnorm.bias")]
    else:  # SigLIP: a patch convolution with a bias, no class token
        rules.append(Direct(("conv1.bias",), e + "patch_embedding.bias"))
    for t in ("weight", "bias"):
        rules += [
            Direct((m + f"input_layernorm.{t}",), h + f"layer_norm1.{t}"),
            QKV((m + f"self_attention.linear_qkv.{t}",), *(h + f"self_attn.{p}_proj.{t}" for p in "qkv")),
            Direct((m + f"self_attention.linear_proj.{t}",), h + f"self_attn.out_proj.{t}"),
            Direct((m + f"pre_mlp_layernorm.{t}",), h + f"layer_norm2.{t}"),
            Direct((m + f"mlp.linear_fc1.{t}",), h + f"mlp.fc1.{t}"),
            Direct((m + f"mlp.linear_fc2.{t}",), h + f"mlp.fc2.{t}"),
        ]
    return rules


def prefixed(rules: List[object], mcore: str, hf: dict) -> List[object]:
    """The same rules for a sub-model: ``mcore`` in front of every Megatron name, and each HF name's leading
    ``old`` prefix replaced by ``hf[old]`` (a VLM's language model: ``model.`` -> ``language_model.model.``)."""
    def hf_name(name: str) -> str:
        for old, new in hf.items():
            if name.startswith(old):
                return new + name[len(old):]
        return name

    out = []
    for rule in rules:
        changes = {f.name: (tuple(mcore + n for n in rule.mcore) if f.name == "mcore" else hf_name(value))
                   for f in dataclasses.fields(rule) for value in [getattr(rule, f.name)]
                   if f.name == "mcore" or isinstance(value, str)}
        out.append(dataclasses.replace(rule, **changes))
    return out
