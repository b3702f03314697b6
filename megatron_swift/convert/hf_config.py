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
    return fields


def check_keys(hf: dict, where: str, supported: Dict[str, object]) -> None:
    """One error naming every HF key whose value this model cannot be built with: ``supported`` maps a key to
    a predicate of its value (its absence passes) and the phrase that says what is supported."""
    problems = [f"{key}={hf[key]} ({phrase})" for key, (ok, phrase) in supported.items()
                if key in hf and hf[key] is not None and not ok(hf[key])]
    if problems:
        raise DataError(where, None, "unsupported: " + "; ".join(problems))


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
    return config


# Parts of MoE families' HF config readers and writers (a family's hf_read / hf_write put them together).
def routed_fields(hf: dict, experts: str, width: str, norm_topk_default: bool = False) -> Dict[str, object]:
    """Routed experts: their number (key ``experts``), width (key ``width``) and top-k; ``norm_topk_prob``
    True is a softmax over the top-k logits (weights summing to 1), False top-k of a softmax over all."""
    return dict(num_experts=hf[experts], moe_ffn_hidden_size=hf[width], moe_router_topk=hf["num_experts_per_tok"],
                moe_router_pre_softmax=not hf.get("norm_topk_prob", norm_topk_default))


def routed_keys(arch: dict, experts: str, width: str) -> Dict[str, object]:
    """The HF keys routed_fields reads, from an Arch record."""
    return {experts: arch["num_experts"], width: arch["moe_ffn_hidden_size"],
            "num_experts_per_tok": arch["moe_router_topk"],
            "norm_topk_prob": not arch.get("moe_router_pre_softmax", False)}


def sparse_step_fields(hf: dict) -> Dict[str, object]:
    """Qwen-MoE's dense layers: layer i routes when (i + 1) % decoder_sparse_step == 0 and i is not in
    mlp_only_layers."""
    return dict(moe_sparse_step=hf.get("decoder_sparse_step", 1) or 1,
                moe_dense_layers=tuple(hf.get("mlp_only_layers") or ()))


def sparse_step_keys(arch: dict) -> Dict[str, object]:
    return dict(decoder_sparse_step=arch.get("moe_sparse_step", 1), mlp_only_layers=list(arch.get("moe_dense_layers", ())))


def stored_nextn_layers(hf: dict, folder: str) -> int:
    """How many multi-token-prediction layers a DeepSeek-V3 / GLM-4.5 folder stores after the decoder's
    (``model.layers.{N + i}.eh_proj.weight``): ``num_nextn_predict_layers``, less those its weights lack (an
    export of a fine-tune through transformers keeps the key but drops the tensors); the key's count when the
    folder has no weights (a config.json alone, for planning)."""
    count, n = int(hf.get("num_nextn_predict_layers") or 0), hf["num_hidden_layers"]
    index, single = os.path.join(folder, "model.safetensors.index.json"), os.path.join(folder, "model.safetensors")
    if not count:
        return 0
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = set(json.load(f).get("weight_map", {}))
    elif os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            names = set(f.keys())
    else:
        return count
    return sum(1 for i in range(count) if f"model.layers.{n + i}.eh_proj.weight" in names)
