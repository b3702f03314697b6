"""DeepSeek-V2/V3 configs (families/deepseek.py): published sizes' parameter counts, config.json read and written
back, and what megatron-core would compute differently from transformers refused in one line naming the key."""
from __future__ import annotations

import json

import pytest

from megatron_swift.config.compose import compose
from megatron_swift.data.errors import DataError
from megatron_swift.models import families
from megatron_swift.models.arch import resolve
from megatron_swift.plan.memory import Layout, stage_params

# A DeepSeek-V3 config.json as its authors publish it (the numbers of deepseek-ai/DeepSeek-V3), shrunk to 2 layers.
V3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
      "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 2,
      "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
      "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
      "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
      "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 1,
      "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
      "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False,
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                       "original_max_position_embeddings": 4096, "type": "yarn"},
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [128, 128]}}


def _arch(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return resolve(compose(["+model=deepseek", f"model.pretrained={tmp_path}"]).model)


@pytest.mark.parametrize("size,billions", [("v3-671b", 671.0), ("v2-lite", 15.7), ("moonlight-16b-a3b", 16.0)])
def test_published_sizes_have_their_published_parameter_counts(size, billions):
    """The planner's count (as megatron-core allocates, without the MTP module) of each named size."""
    arch = resolve(compose(["+model=deepseek", f"model.size={size}"]).model)
    params = stage_params(arch, arch.vocab_size, Layout(), 0)
    assert abs((params["dense"] + params["expert"]) / 1e9 - billions) < 0.05


def test_config_is_read_and_written_back(tmp_path):
    """The FP8 V3 config: every architecture key comes back when an export has no source config.json to copy."""
    arch = _arch(tmp_path, V3)
    assert (arch.num_experts, arch.moe_router_topk, arch.num_query_groups) == (256, 8, 128)
    assert arch.rope_scaling.factor == 40 and arch.rope_scaling.mscale_all_dim == 1.0
    written = families.get("deepseek").write_hf(arch.plain(), "bfloat16")
    skip = {"topk_method", "moe_layer_freq", "num_nextn_predict_layers", "quantization_config", "rope_scaling",
            "rope_theta"}
    assert {k: written[k] for k in V3 if k not in skip} == {k: v for k, v in V3.items() if k not in skip}
    assert written["rope_scaling"] == {k: v for k, v in V3["rope_scaling"].items() if k != "type"} | {
        "rope_type": "yarn"}
    assert "quantization_config" not in written
    assert _arch(tmp_path, written) == arch  # read again: the same architecture


REFUSED = {
    "quantization": (dict(quantization_config=dict(quant_method="bitsandbytes")),
                     "quantization_config.quant_method='bitsandbytes' is not supported; supported: fp8"),
    "rope-layout": (dict(rope_interleave=False), "rope_interleave=false is not supported"),
    "group-scores": (dict(topk_group=2), "n_group=8 with topk_group=2 and num_experts_per_tok=8 is not supported"),
    "sigmoid-unnormalised": (dict(norm_topk_prob=False), "norm_topk_prob=false with sigmoid scoring"),
    "v2-normalised": (dict(architectures=["DeepseekV2ForCausalLM"], scoring_func="softmax", topk_method="greedy",
                           n_group=1, topk_group=1),
                      "norm_topk_prob=true with softmax scoring is not supported"),
    "rope-type": (dict(rope_scaling=dict(type="linear", factor=2.0)),
                  "rope_scaling type 'linear' is not supported for MLA; supported: default, yarn"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_megatron_core_computes_otherwise_is_refused_naming_the_key(tmp_path, case):
    change, message = REFUSED[case]
    with pytest.raises(DataError) as error:
        _arch(tmp_path, dict(V3, **change))
    assert message in str(error.value) and str(tmp_path / "config.json") in str(error.value)
    assert "\n" not in str(error.value)


def test_fp8_source_export_writes_dequantized_weights_without_the_quantization_entry(tmp_path, capsys):
    """What an export from an FP8 folder takes from it: config.json without quantization_config (said in a
    printed line), and the tensors it keeps as they are (an MTP layer dropped by model.mtp_num_layers=0)
    dequantized, scales left out."""
    import torch
    from safetensors.torch import save_file

    from megatron_swift.convert import hf_export
    from megatron_swift.convert.fp8 import quantize

    weight = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, scale = quantize(weight, (128, 128))
    save_file({"model.layers.2.eh_proj.weight": q, "model.layers.2.eh_proj.weight_scale_inv": scale,
               "model.layers.2.enorm.weight": torch.ones(7)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(V3))
    arch = resolve(compose(["+model=deepseek", f"model.pretrained={tmp_path}", "model.mtp_num_layers=0"]).model)
    assert arch.family.mtp_layers_supported(arch) == 1  # the folder stores one
    kept = dict(hf_export._unused_from(str(tmp_path), arch.family, arch))
    rows, cols = torch.arange(300) // 128, torch.arange(200) // 128
    assert sorted(kept) == ["model.layers.2.eh_proj.weight", "model.layers.2.enorm.weight"]
    assert torch.equal(kept["model.layers.2.eh_proj.weight"], q.float() * scale[rows][:, cols])
    assert (kept["model.layers.2.eh_proj.weight"] - weight).abs().max() < 0.07 * weight.abs().max()
    out = tmp_path / "out"
    out.mkdir()
    hf_export._write_config(str(out), arch.family, arch.plain(), "bfloat16", str(tmp_path))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert "quantization_config is left out of config.json" in capsys.readouterr().out


def test_context_parallelism_is_refused_and_the_planner_skips_it():
    from megatron_swift.config.errors import ConfigError
    from megatron_swift.config.validate import validate
    from megatron_swift.plan.search import candidates

    with pytest.raises(ConfigError) as error:
        validate(compose(["+model=deepseek", "parallel.cp=2"]), 2)
    assert "parallel.cp=2: context parallelism is not supported for multi-head latent attention" in str(error.value)
    arch = resolve(compose(["+model=deepseek", "model.size=v3-671b"]).model)
    found = candidates(arch, lambda tp: 129280, 64, 8, "h100-80gb", 8192, 512)
    assert found and all(c.layout.cp == 1 for c in found)
