"""OLMo 2 and Phi-3 / Phi-4 without a process group: HF configs read and written back, refusals (Gemma 3 too), the
planner's parameter counts and the FLOP formula (ground truth: transformers' modules and counts, or a hand count).
Logits, round trips and check.py: tests/multiproc/test_hf_load.py and test_hf_export.py."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from megatron_swift.config.compose import compose
from megatron_swift.data.errors import DataError
from megatron_swift.models import families
from megatron_swift.models.arch import resolve
from megatron_swift.plan.memory import Layout, stage_params
from megatron_swift.training.flops import flops_per_token

from tests.multiproc.test_hf_load import TEXT_MODELS, VOCAB, _save_tiny


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-configs")
    return {name: (kind, root / name, _save_tiny(kind, root / name, **extra))
            for name, (kind, extra) in TEXT_MODELS.items()}


def _arch(family: str, folder):
    return resolve(compose([f"+model={family}", f"model.pretrained={folder}"]).model)


@pytest.mark.parametrize("name", list(TEXT_MODELS))
def test_planned_parameters_equal_transformers(saved, name):
    """Per pipeline stage (PP=1, 2), the planner's count is transformers' numel of the same layers; under TP=2 the
    ranks together hold each split weight once and each replicated one twice (OLMo 2's QK norms split)."""
    family, folder, model = saved[name]
    arch = _arch(family, folder)
    layers, rest = [0] * arch.num_layers, {"embed": 0, "last": 0}
    replicated = 0  # per layer, weights every TP rank holds whole: the norms of hidden width
    for pname, p in model.named_parameters():
        if pname.startswith("model.layers."):
            layers[int(pname.split(".")[2])] += p.numel()
            replicated += p.numel() if pname.endswith("layernorm.weight") and pname.startswith("model.layers.0.") else 0
        else:
            rest["embed" if "embed_tokens" in pname else "last"] += p.numel()
    tied_copy = VOCAB * arch.hidden_size if not arch.untie_embeddings else 0
    for pp in (1, 2):
        for stage in range(pp):
            planned = stage_params(arch, VOCAB, Layout(pp=pp), stage)
            per = arch.num_layers // pp
            expected = sum(layers[stage * per:(stage + 1) * per]) + (rest["embed"] if stage == 0 else 0)
            expected += rest["last"] + (tied_copy if pp > 1 else 0) if stage == pp - 1 else 0
            assert planned["dense"] + planned["expert"] == expected, (name, pp, stage)
    two = stage_params(arch, VOCAB, Layout(tp=2), 0)["dense"]
    final_norm = arch.hidden_size
    head = VOCAB * arch.hidden_size if arch.untie_embeddings else 0
    assert 2 * two == sum(layers) + arch.num_layers * replicated + VOCAB * arch.hidden_size + head + 2 * final_norm


@pytest.mark.parametrize("name", list(TEXT_MODELS))
def test_written_config_builds_the_same_hf_model(saved, name):
    """A config.json written from the stored numbers alone (an export without a source folder) makes transformers
    build the same model: every weight fits and the logits are equal."""
    family, folder, model = saved[name]
    written = families.get(family).write_hf(dict(_arch(family, folder).plain(), vocab_size=VOCAB), "float32")
    assert written["architectures"] == [type(model).__name__]
    config = transformers.AutoConfig.for_model(written.pop("model_type"), **written)
    rebuilt = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    loaded = rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens).logits, model(tokens).logits)


REFUSED = {
    "olmo2-bias": ("olmo2", dict(attention_bias=True), "attention_bias=True"),
    "phi3-window": ("phi3", dict(sliding_window=64), "sliding_window=64"),
    "phi3-longrope": ("phi3", dict(rope_parameters=None, rope_scaling=dict(
        rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=64)),
        "rope_scaling.rope_type='longrope'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unbuildable_config_is_one_line_naming_the_key(saved, tmp_path, case):
    family, change, key = REFUSED[case]
    source = next(folder for kind, folder, _ in saved.values() if kind == family)
    hf = dict(json.loads((source / "config.json").read_text()), **change)
    with pytest.raises(DataError) as error:
        families.get(family).read_hf(hf, str(tmp_path))
    message = str(error.value)
    assert key in message and "\n" not in message


def test_gemma3_is_refused_with_what_is_missing(tmp_path):
    """A Gemma 3 text folder: one line naming the architecture and what this trainer lacks for it (the tools), and
    +model=<any family> with it says the same."""
    config = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16).to_dict()
    config["architectures"] = ["Gemma3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError) as error:
        families.hf_family_name(config, str(tmp_path))
    message = str(error.value)
    assert "Gemma 3" in message and "rope_local_base_freq" in message and "\n" not in message
    with pytest.raises(KeyError, match="rope_local_base_freq"):
        _arch("llama", tmp_path)


def test_flops_by_hand():
    """Tiny OLMo 2 and Phi-3: 2 layers, h=64, f=128, 4 heads of 16, 2 groups (norms are not counted; partial rotary
    changes no matrix product)."""
    s, v = 32, 512
    q, kv = 4 * 16, 2 * 16
    per_layer = 64 * (q + 2 * kv) + q * 64 + 2 * s * q + 3 * 64 * 128
    for family in ("olmo2", "phi3"):
        assert flops_per_token(resolve(compose([f"+model={family}"]).model), s, v) == 6 * (2 * per_layer + 64 * v)


def test_published_sizes():
    """OLMo-2-1124-7B and Phi-4 config.json numbers."""
    olmo = resolve(compose(["+model=olmo2", "model.size=7b"]).model)
    assert (olmo.num_layers, olmo.hidden_size, olmo.ffn_hidden_size, olmo.num_query_groups) == (32, 4096, 11008, 32)
    assert olmo.vocab_size == 100352 and olmo.rotary_base == 5e5
    phi = resolve(compose(["+model=phi3", "model.size=phi-4"]).model)
    assert (phi.num_layers, phi.hidden_size, phi.ffn_hidden_size, phi.num_attention_heads, phi.num_query_groups) == (
        40, 5120, 17920, 40, 10)
    mini = resolve(compose(["+model=phi3", "model.size=phi-4-mini"]).model)
    assert mini.rotary_percent == 0.75 and not mini.untie_embeddings and mini.kv_channels == 128
