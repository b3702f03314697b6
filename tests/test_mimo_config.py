"""MiMo configs (families/mimo.py): config.json read and written back with its MTP layers, model.mtp_num_layers
dropping them (tensors declared unused, a printed line) or refused above the checkpoint's count."""
from __future__ import annotations

import json

import pytest

from megatron_swift.config.compose import compose
from megatron_swift.models import families
from megatron_swift.models.arch import resolve

# MiMo-7B-RL's config.json numbers (XiaomiMiMo/MiMo-7B-RL), as its remote code reads them.
MIMO_7B = {"architectures": ["MiMoForCausalLM"], "model_type": "mimo", "vocab_size": 151680, "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
           "max_position_embeddings": 32768, "rope_theta": 640000, "rms_norm_eps": 1e-05,
           "tie_word_embeddings": False, "num_nextn_predict_layers": 1, "hidden_act": "silu"}


def _arch(tmp_path, *overrides):
    (tmp_path / "config.json").write_text(json.dumps(MIMO_7B))
    return resolve(compose(["+model=mimo", f"model.pretrained={tmp_path}", *overrides]).model)


def test_config_is_read_and_written_back(tmp_path):
    arch = _arch(tmp_path)
    assert arch.mtp_num_layers == 1 and arch.num_query_groups == 8 and arch.uses_qkv_bias
    assert arch == resolve(compose(["+model=mimo", "model.size=mimo-7b"]).model)  # the named size
    written = families.get("mimo").write_hf(arch.plain(), "bfloat16")
    assert {k: written[k] for k in MIMO_7B if k != "rope_theta"} == {k: v for k, v in MIMO_7B.items()
                                                                      if k != "rope_theta"}
    rules = families.get("mimo").rules(arch)
    assert any("model.mtp_layers.0.input_proj.weight" in getattr(r, "hf", "") for r in rules)


def test_mtp_num_layers_zero_drops_them_and_more_is_refused(tmp_path, capsys, monkeypatch):
    from megatron_swift.config.errors import ConfigError
    from megatron_swift.config.validate import precheck

    arch = _arch(tmp_path, "model.mtp_num_layers=0")
    family = families.get("mimo")
    assert arch.mtp_num_layers == 0 and not any("mtp" in str(r.mcore) for r in family.rules(arch))
    assert family.hf_unused(arch, "model.mtp_layers.0.input_proj.weight")  # kept for an export from the folder
    assert not family.hf_unused(_arch(tmp_path), "model.mtp_layers.0.input_proj.weight")
    assert family.write_hf(arch.plain(), "bfloat16")["num_nextn_predict_layers"] == 1  # they are written back
    monkeypatch.setenv("WORLD_SIZE", "1")
    (tmp_path / "config.json").write_text(json.dumps(MIMO_7B))
    with pytest.raises(ConfigError, match=r"model.mtp_num_layers=2 is not supported for \+model=mimo \(supported: 0..1"):
        precheck(compose(["+model=mimo", f"model.pretrained={tmp_path}", "model.mtp_num_layers=2"]))
    with pytest.raises(ConfigError, match="model.mtp_num_layers=1 is not supported for \\+model=qwen3"):
        precheck(compose(["+model=qwen3", "model.mtp_num_layers=1"]))
