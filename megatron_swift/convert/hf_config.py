"""Read an HF checkpoint folder's config.json into the numbers a Megatron model needs."""
from __future__ import annotations

import json
import os
from typing import Dict

from megatron_swift.data.errors import DataError


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise DataError(folder, None, "not a Hugging Face checkpoint folder (no config.json) (model.pretrained)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _rope(hf: dict, folder: str):
    """(rope_theta, partial rotary factor, RopeScaling or None) read by models.rope's table of HF RoPE keys."""
    from megatron_swift.models.rope import RopeError, read_hf_rope

    try:
        return read_hf_rope(hf)
    except RopeError as e:
        raise DataError(os.path.join(folder, "config.json"), None, str(e)) from None


def arch_fields(hf: dict, folder: str) -> Dict[str, object]:
    """Size-table fields (see models.families.base.Size) read from an HF config."""
    from megatron_swift.convert.fp8 import block_size

    block_size(hf, folder)  # an unsupported quantization is refused here, before anything is built
    heads = hf["num_attention_heads"]
    theta, partial, scaling = _rope(hf, folder)
    fields = dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=theta,
        rotary_percent=partial,
        rope_scaling=scaling,
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        untie_embeddings=not hf.get("tie_word_embeddings", False),
    )
    # transformers 5 writes num_local_experts (its attribute map), older versions num_experts.
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if experts:
        _check_all_layers_moe(hf, folder)
        fields.update(num_experts=experts, moe_ffn_hidden_size=hf["moe_intermediate_size"],
                      moe_router_topk=hf["num_experts_per_tok"],
                      # transformers' Qwen3MoeConfig defaults norm_topk_prob to False
                      moe_router_pre_softmax=not hf.get("norm_topk_prob", False))
    return fields


def _check_all_layers_moe(hf: dict, folder: str) -> None:
    """Only models whose every layer is an MoE layer without a shared expert are built (Qwen3-MoE)."""
    problems = []
    if hf.get("decoder_sparse_step", 1) != 1:
        problems.append(f"decoder_sparse_step={hf['decoder_sparse_step']} (only 1 is supported)")
    if hf.get("mlp_only_layers"):
        problems.append(f"mlp_only_layers={hf['mlp_only_layers']} (dense layers among MoE layers)")
    if hf.get("shared_expert_intermediate_size"):
        problems.append("a shared expert (shared_expert_intermediate_size)")
    if problems:
        raise DataError(os.path.join(folder, "config.json"), None, "unsupported MoE layout: " + "; ".join(problems))


def to_hf_config(family, arch: dict, dtype: str) -> dict:
    """A config.json for ``transformers`` from stored architecture numbers (when no source config exists)."""
    config = dict(
        architectures=[family.hf_architectures[0]],
        model_type=family.hf_model_type,
        num_hidden_layers=arch["num_layers"],
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["ffn_hidden_size"],
        num_attention_heads=arch["num_attention_heads"],
        num_key_value_heads=arch["num_query_groups"],
        head_dim=arch["kv_channels"],
        vocab_size=arch["vocab_size"],
        max_position_embeddings=arch["max_position_embeddings"],
        rms_norm_eps=arch["norm_epsilon"],
        tie_word_embeddings=not arch["untie_embeddings"],
        hidden_act="silu",
        torch_dtype=dtype,
    )
    from megatron_swift.models.rope import RopeScaling, write_hf_rope

    scaling = arch.get("rope_scaling")
    write_hf_rope(config, arch["rotary_base"], arch.get("rotary_percent", 1.0),
                  RopeScaling(**scaling) if isinstance(scaling, dict) else scaling)
    if arch.get("num_experts"):
        config.update(num_experts=arch["num_experts"], moe_intermediate_size=arch["moe_ffn_hidden_size"],
                      num_experts_per_tok=arch["moe_router_topk"],
                      norm_topk_prob=not arch.get("moe_router_pre_softmax", False),
                      decoder_sparse_step=1, mlp_only_layers=[])
    return config
