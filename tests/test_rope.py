"""RoPE from HF configs (models/rope.py): transformers' frequencies and attention factor for every supported type,
both config spellings read alike, written back as read, unsupported types refused with one line."""
from __future__ import annotations

import json

import pytest
import torch
import transformers  # a test dependency: missing, the suite must fail, not skip
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_swift.models import families
from megatron_swift.models.arch import Arch
from megatron_swift.models.rope import RopeError, inv_freq, read_hf_rope, rotary_dim

# (rope dict, partial_rotary_factor, head_dim): non-default values of every key each type reads
SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 2.5}, 1.0, 16),
    "llama3-31": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}, 1.0, 128),
    "llama3-odd": ({"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                    "original_max_position_embeddings": 32}, 1.0, 16),
    "llama3-partial": ({"rope_type": "llama3", "factor": 3.0, "low_freq_factor": 1.5, "high_freq_factor": 6.0,
                        "original_max_position_embeddings": 24}, 0.5, 32),
    "yarn-qwen": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 1.0, 16),
    "yarn-deepseek": ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                       "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, 1.0, 64),
    "yarn-mscale": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16,
                     "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.7}, 1.0, 16),
    "yarn-untruncated-partial": ({"rope_type": "yarn", "factor": 6.0, "original_max_position_embeddings": 20,
                                  "truncate": False, "attention_factor": 1.3}, 0.75, 32),
    "yarn-no-factor": ({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32}, 1.0, 16),
}


def _hf_config(rope: dict, partial: float, head_dim: int, theta: float = 5e5):
    rope = dict(rope, rope_theta=theta)
    if partial != 1.0:
        rope["partial_rotary_factor"] = partial
    return transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=128, rope_parameters=rope)


@pytest.mark.parametrize("case", list(SCALINGS))
def test_frequencies_and_attention_factor_are_transformers(case):
    rope, partial, head_dim = SCALINGS[case]
    config = _hf_config(rope, partial, head_dim)
    want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
    theta, got_partial, scaling = read_hf_rope(json.loads(config.to_json_string()))
    assert (theta, got_partial) == (5e5, partial)
    got, factor = inv_freq(scaling, rotary_dim(head_dim, got_partial), theta, 128)
    assert got.dtype == torch.float32 and torch.equal(got, want), case
    assert factor == want_factor, case


def test_default_rope_is_megatron_cores_own():
    theta, partial, scaling = read_hf_rope({"rope_theta": 1e6})
    assert (theta, partial, scaling) == (1e6, 1.0, None)
    got, factor = inv_freq(None, 16, theta, 128)
    assert factor == 1.0 and torch.equal(got, 1.0 / (theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)))


def test_both_spellings_read_alike_and_write_back_as_read():
    v4 = {"rope_theta": 1e6, "partial_rotary_factor": 0.5,
          "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    v5 = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                              "rope_theta": 1e6, "partial_rotary_factor": 0.5}}
    assert read_hf_rope(v4) == read_hf_rope(v5)
    theta, partial, scaling = read_hf_rope(v4)
    assert scaling.hf() == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    # A config.json written from stored numbers (no source folder) reads back to the same architecture.
    family = families.get("qwen2")
    fields = family.read_hf(dict(v4, num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                 max_position_embeddings=131072), "/nowhere")
    arch = Arch(family=family, num_experts=None, moe_ffn_hidden_size=None, moe_router_topk=None,
                **{k: v for k, v in fields.items()})
    plain = json.loads(json.dumps(arch.plain()))  # as a checkpoint stores it
    written = family.write_hf(plain, "float32")
    assert written["rope_scaling"] == scaling.hf() and written["partial_rotary_factor"] == 0.5
    assert written["rope_theta"] == 1e6
    assert Arch(family=family, **plain) == arch
    assert family.read_hf(written, "/nowhere") == fields
    # transformers reads what was written as the same RoPE.
    config = transformers.Qwen2Config(**{k: v for k, v in written.items() if k != "architectures"})
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 4.0


def test_default_rope_records_are_unchanged():
    arch = Arch(family=families.get("qwen3"), num_experts=None, moe_ffn_hidden_size=None, moe_router_topk=None,
                **{k: v for k, v in vars(families.get("qwen3").size("tiny")).items()
                   if k not in ("num_experts", "moe_ffn_hidden_size", "moe_router_topk")})
    assert "rope_scaling" not in arch.plain() and "rotary_percent" not in arch.plain()


@pytest.mark.parametrize("rope,message", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "rope_scaling.type='dynamic' is not supported; supported RoPE types: default, linear, llama3, yarn"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}},
     "rope_parameters.rope_type='longrope' is not supported; supported RoPE types: default, linear, llama3, yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
     "rope_scaling.high_freq_factor is missing (llama3 RoPE needs factor, low_freq_factor, high_freq_factor)"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "finetuned": True}},
     "rope_scaling.finetuned: not a linear RoPE parameter this trainer reads (linear reads: factor)"),
])
def test_unsupported_rope_is_one_line_naming_the_key(rope, message):
    with pytest.raises(RopeError) as e:
        read_hf_rope(rope)
    assert str(e.value) == message


def test_llama_3_1_and_3_2_sizes_carry_their_published_rope_scaling():
    from megatron_swift.config.compose import compose
    from megatron_swift.models.arch import resolve

    published = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}  # Llama-3.2-1B's config.json
    arch = resolve(compose(["+model=llama", "model.size=llama3-1b"]).model)
    assert arch.rope_scaling.hf() == published and arch.max_position_embeddings == 131072
    written = arch.family.write_hf(dict(arch.plain(), vocab_size=128256), "bfloat16")
    assert written["rope_scaling"] == published and written["rope_theta"] == 5e5
    arch = resolve(compose(["+model=llama", "model.size=llama3.1-8b"]).model)
    assert arch.rope_scaling.factor == 8.0 and resolve(compose(["+model=llama", "model.size=llama3-8b"]).model
                                                       ).rope_scaling is None


def test_a_vlms_language_model_reads_and_writes_its_rope():
    """LLaVA's text_config goes through its text family's reader and writer (families/llava.py)."""
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=56, patch_size=14)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    text = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, rope_scaling=dict(yarn))
    hf = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=299,
                                  image_seq_length=16).to_dict()
    llava = families.get("llava")
    fields = llava.read_hf(hf, "/nowhere")
    assert fields["rope_scaling"].hf() == yarn
    arch = Arch(family=llava, num_experts=None, moe_ffn_hidden_size=None, moe_router_topk=None, **fields)
    written = llava.write_hf(json.loads(json.dumps(arch.plain())), "float32")
    assert written["text_config"]["rope_scaling"] == yarn
