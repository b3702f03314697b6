"""MoE families (Mixtral, Qwen2-MoE, GLM-4.5) without a process group: their HF configs read and written back,
refusals, the layer kinds, the planner's parameter counts and the FLOP formula (ground truth: transformers'
modules and counts, or a hand count). Logits and round trips: tests/multiproc/test_hf_load.py."""
from __future__ import annotations

import re

import pytest
import torch
import transformers

from megatron_swift.config.compose import compose
from megatron_swift.data.errors import DataError
from megatron_swift.models import families
from megatron_swift.models.arch import resolve
from megatron_swift.plan.memory import Layout, stage_params
from megatron_swift.training.flops import flops_per_token

from tests.multiproc.test_hf_load import MOE_MODELS, VOCAB, _save_tiny

_HF = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "glm4_moe": "Glm4Moe", "qwen3_moe": "Qwen3Moe"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each test model of test_hf_load saved once: name -> (family, folder, HF model)."""
    root = tmp_path_factory.mktemp("moe-configs")
    return {name: (kind, root / name, _save_tiny(kind, root / name, **extra))
            for name, (kind, extra) in MOE_MODELS.items()}


def _arch(family: str, folder):
    return resolve(compose([f"+model={family}", f"model.pretrained={folder}"]).model)


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_layer_kinds_and_planned_parameters_equal_transformers(saved, name):
    """Which layers route (transformers' module classes) and, per pipeline stage, the parameters the planner
    counts (transformers' numel of the same layers; the router's correction bias is a buffer in both)."""
    family, folder, model = saved[name]
    arch = _arch(family, folder)
    routed = [int(hasattr(layer.mlp, "experts")) for layer in model.model.layers]
    assert (arch.moe_layer_pattern or [1] * arch.num_layers) == routed
    per_layer = [0] * arch.num_layers
    rest = {"embed": 0, "last": 0}
    for pname, p in model.named_parameters():
        layer = re.match(r"model\.layers\.(\d+)\.", pname)
        if layer:
            per_layer[int(layer.group(1))] += p.numel()
        else:
            rest["embed" if "embed_tokens" in pname else "last"] += p.numel()
    tied_copy = VOCAB * arch.hidden_size if not arch.untie_embeddings else 0  # the last stage's copy under PP
    for pp in (1, 2):
        for stage in range(pp):
            planned = stage_params(arch, VOCAB, Layout(pp=pp), stage)
            layers = arch.num_layers // pp
            expected = sum(per_layer[stage * layers:(stage + 1) * layers])
            expected += rest["embed"] if stage == 0 else 0
            expected += rest["last"] + (tied_copy if pp > 1 else 0) if stage == pp - 1 else 0
            assert planned["dense"] + planned["expert"] == expected, (name, pp, stage)


@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_written_config_builds_the_same_hf_model(saved, name):
    """A config.json written from the stored numbers alone (an export without a source folder) makes
    transformers build the same model: every weight fits and the logits are equal."""
    family, folder, model = saved[name]
    arch = _arch(family, folder)
    written = families.get(family).write_hf(dict(arch.plain(), vocab_size=VOCAB), "float32")
    assert written["architectures"] == [f"{_HF[family]}ForCausalLM"]
    config = transformers.AutoConfig.for_model(written.pop("model_type"), **written)
    rebuilt = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    missing = rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(tokens).logits, model(tokens).logits)


REFUSED = {
    "glm-norm": ("glm4_moe", dict(norm_topk_prob=False), "norm_topk_prob=False"),
    "glm-top1": ("glm4_moe", dict(num_experts_per_tok=1), "num_experts_per_tok=1"),
    "glm-groups": ("glm4_moe", dict(n_group=2, topk_group=2, num_experts_per_tok=2), "topk_group=2"),
    "mixtral-window": ("mixtral", dict(sliding_window=64), "sliding_window=64"),
    "qwen3_moe-shared": ("qwen3_moe", dict(shared_expert_intermediate_size=64),
                         "shared_expert_intermediate_size=64"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unbuildable_config_is_one_line_naming_the_key(saved, tmp_path, case):
    family, change, key = REFUSED[case]
    source = next(folder for kind, folder, _ in saved.values() if kind == family) if family != "qwen3_moe" else None
    hf = dict(transformers.AutoConfig.from_pretrained(source).to_dict()) if source else dict(
        transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4).to_dict())
    hf.update(change)
    with pytest.raises(DataError) as error:
        families.get(family).read_hf(hf, str(tmp_path))
    message = str(error.value)
    assert key in message and str(tmp_path / "config.json") in message and "\n" not in message


def test_glm_mtp_layers_are_built_or_dropped_with_a_line(saved, tmp_path, capsys):
    """The layers after the decoder's are MTP layers: built (their embedding / head copies declared unused), or
    with model.mtp_num_layers=0 declared unused with a printed line."""
    import dataclasses

    from megatron_swift.models.families import glm4_moe

    _, folder, _ = saved["glm4_moe"]
    hf = transformers.AutoConfig.from_pretrained(folder).to_dict()
    hf.update(num_nextn_predict_layers=1)
    family = families.get("glm4_moe")
    fields = family.read_hf(hf, str(tmp_path))
    assert fields["mtp_num_layers"] == 1
    arch = dataclasses.replace(_arch("glm4_moe", folder), mtp_num_layers=1,
                               family_options=fields["family_options"])
    n = arch.num_layers
    assert not family.hf_unused(arch, f"model.layers.{n}.eh_proj.weight")
    assert family.hf_unused(arch, f"model.layers.{n}.embed_tokens.weight")
    assert not family.hf_unused(arch, f"model.layers.{n - 1}.mlp.gate.weight")
    dropped = dataclasses.replace(arch, mtp_num_layers=0)
    assert family.hf_unused(dropped, f"model.layers.{n}.eh_proj.weight")
    glm4_moe._note_dropped(dropped)
    assert "model.mtp_num_layers=0: 1 of the checkpoint's 1 multi-token-prediction" in capsys.readouterr().out
    assert family.write_hf(dropped.plain(), "float32")["num_nextn_predict_layers"] == 1


def test_moe_flops_by_hand():
    """Tiny GLM-4.5: 3 layers, the first dense; h=64, f=128, 4 heads of 32, 2 groups; 4 experts of 32, top-2,
    a shared expert of 32. Tiny Qwen2-MoE adds a gated shared expert (64 wide) to every layer."""
    s, v = 32, 512
    glm = resolve(compose(["+model=glm4_moe"]).model)
    attention = 64 * (128 + 2 * 64) + 128 * 64 + 2 * s * 128
    dense, moe = 3 * 64 * 128, 2 * 3 * 64 * 32 + 64 * 4 + 3 * 64 * 32
    assert flops_per_token(glm, s, v) == 6 * (3 * attention + dense + 2 * moe + 64 * v)
    qwen = resolve(compose(["+model=qwen2_moe"]).model)  # 2 layers, heads of 16
    attention = 64 * (64 + 2 * 32) + 64 * 64 + 2 * s * 64
    moe = 2 * 3 * 64 * 32 + 64 * 4 + 3 * 64 * 64 + 64
    assert flops_per_token(qwen, s, v) == 6 * (2 * attention + 2 * moe + 64 * v)


def test_records_of_older_moe_models_are_unchanged():
    """A Qwen3-MoE record holds none of the new MoE fields (it equals one written before they existed)."""
    record = resolve(compose(["+model=qwen3_moe"]).model).plain()
    assert not [k for k in record if k.startswith("moe_") and k not in
                ("moe_ffn_hidden_size", "moe_router_topk", "moe_router_pre_softmax")]
    assert "qkv_bias" not in record and "qk_norm" not in record


def test_shared_experts_freeze_group_names_them_only():
    from megatron_swift.tuners import FREEZE_GROUPS

    pattern = re.compile(FREEZE_GROUPS["shared_experts"])
    assert pattern.search("decoder.layers.3.mlp.shared_experts.linear_fc1.weight")
    assert pattern.search("decoder.layers.3.mlp.shared_experts.gate_weight")
    assert not pattern.search("decoder.layers.3.mlp.experts.local_experts.0.linear_fc1.weight")


def test_training_moe_under_tp_needs_sequence_parallelism(monkeypatch):
    """megatron-core 0.16 raises inside the MoE layer's training forward under TP without SP: one config line
    before any work instead; with parallel.sp=true (or no training steps) the config passes."""
    from megatron_swift.config.errors import ConfigError
    from megatron_swift.config.validate import precheck

    monkeypatch.setenv("WORLD_SIZE", "2")
    base = ["+model=glm4_moe", "parallel.tp=2", "train.device=cpu", "train.global_batch_size=2"]
    with pytest.raises(ConfigError, match="parallel.tp=2 on a MoE model needs parallel.sp=true"):
        precheck(compose([*base, "train.train_iters=1"]))
    precheck(compose([*base, "train.train_iters=1", "parallel.sp=true"]))
    precheck(compose([*base, "train.train_iters=0"]))
