"""LoRA and freezing on megatron-core, checked against the base model, other layouts, transformers and peft.

- At initialisation a LoRA model's logits are exactly the base model's.
- TP=2 trains the same function as TP=1 (A replicated / split as its base linear is, B the other way).
- After training, the merged HF export (transformers) and the PEFT adapter (peft on the HF base) give the
  Megatron LoRA model's logits within 1e-4, at TP=1 and TP=2.
- An adapter-only checkpoint resumes (base read again from model.pretrained) exactly like an unbroken run.
- Frozen parameters are bitwise unchanged after training; those the trainable regex picks did change.
"""
from __future__ import annotations

import json
import subprocess

import peft  # test dependencies (setup.py [test]): missing, the suite must fail, not skip
import pytest
import torch
import transformers

from tests.conftest import ROOT, launch_cmd, read_metrics, run_train, train_env
from tests.multiproc.test_hf_load import VOCAB, WORKER, _save_tiny

CONVERT = ROOT / "tools" / "convert" / "mcore_to_hf.py"


def _base(hf, out, *extra):
    return ["+model=qwen3", f"model.pretrained={hf}", "data=sft", "data.tokenizer=byte", "data.truncation=truncate",
            "train.seq_length=64", "train.precision=fp32", "train.device=cpu", "logging.tensorboard=false",
            f"train.output_dir={out}", "train.max_epochs=null", *extra]


LORA = ["tuner=lora", "tuner.rank=4", "tuner.alpha=8"]


def _logits(tmp_path, nproc, overrides, name):
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "tokens.pt")
    out = tmp_path / f"{name}.pt"
    proc = subprocess.run(launch_cmd(nproc, [str(tmp_path / "tokens.pt"), str(out), *overrides], script=WORKER),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return tokens, torch.load(out, weights_only=True)[..., :VOCAB]


def test_lora_model_at_initialisation_equals_the_base_exactly(tmp_path, tiny_hf):
    layout = ["parallel.tp=2", "train.train_iters=1"]
    _, base = _logits(tmp_path, 2, _base(tiny_hf, tmp_path / "a", *layout), "base")
    _, lora = _logits(tmp_path, 2, _base(tiny_hf, tmp_path / "b", *layout, *LORA, "tuner.rslora=true"), "lora")
    assert torch.equal(base, lora)


STEPS = ["train.train_iters=4", "train.lr=1e-2", "train.lr_warmup_iters=1", "train.global_batch_size=4"]


@pytest.fixture(scope="module")
def tp1_losses(tmp_path_factory, tiny_hf):
    out = tmp_path_factory.mktemp("tp1")
    run_train(1, _base(tiny_hf, out, *LORA, *STEPS))
    return read_metrics(out)


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.tp=2", "parallel.sp=true"], ["parallel.pp=2"],
                                    ["parallel.distributed_optimizer=true"]],
                         ids=["tp2", "tp2-sp", "pp2", "dp2-distopt"])
def test_other_layouts_train_the_same_function_as_tp1(tmp_path, tiny_hf, tp1_losses, layout):
    run_train(2, _base(tiny_hf, tmp_path / "run", *LORA, *STEPS, *layout))
    one, two = tp1_losses, read_metrics(tmp_path / "run")
    assert len(one) == len(two) == 4 and one[-1]["loss"] < one[0]["loss"] - 0.05  # it does learn
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (layout, a["iteration"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), (layout, a["iteration"], a["grad_norm"],
                                                                           b["grad_norm"])


# rsLoRA at TP=2: scale alpha/sqrt(r) = 4 instead of alpha/r = 2, so a scale that ignored tuner.rslora (in the
# forward, the merge or the adapter config) would give other logits than peft's.
@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tp=2", "tuner.rslora=true"])],
                         ids=["tp1", "tp2-rslora"])
def test_merged_and_peft_exports_give_the_megatron_lora_logits(tmp_path, tiny_hf, nproc, layout):
    run = tmp_path / "run"
    overrides = _base(tiny_hf, run, *LORA, "train.train_iters=3", "train.lr=2e-2", *layout)
    run_train(nproc, overrides)
    # The same setup resumes the final checkpoint (base from model.pretrained, adapters from the checkpoint).
    tokens, megatron = _logits(tmp_path, nproc, overrides, "megatron")
    for export in ("merged", "adapter"):
        proc = subprocess.run(["python", str(CONVERT), "--ckpt", str(run), "--out", str(tmp_path / export),
                               "--export", export], cwd=ROOT, env=train_env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf).float().eval()
    with torch.no_grad():
        base_logits = base(tokens).logits
        merged_logits = merged(tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        peft_logits = adapted(tokens).logits
    assert (megatron - base_logits).abs().max() > 1e-3  # the adapters moved the model
    assert (merged_logits - megatron).abs().max() < 1e-4
    assert (peft_logits - megatron).abs().max() < 1e-4
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and "q_proj" in config["target_modules"]
    assert config["use_rslora"] == ("tuner.rslora=true" in layout)


def test_lora_on_moe_experts_merges_into_the_hf_model(tmp_path):
    from tests.multiproc.test_hf_load import _MOE

    hf = tmp_path / "hf"
    _save_tiny("qwen3_moe", hf, **dict(_MOE, norm_topk_prob=True))
    run = tmp_path / "run"
    overrides = [*_base(hf, run, *LORA, "train.train_iters=3", "train.lr=2e-2", "parallel.ep=2", "parallel.etp=1"),
                 "+model=qwen3_moe"]
    overrides.remove("+model=qwen3")
    run_train(2, overrides)
    tokens, megatron = _logits(tmp_path, 2, overrides, "megatron")
    proc = subprocess.run(["python", str(CONVERT), "--ckpt", str(run), "--out", str(tmp_path / "merged")], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    with torch.no_grad():
        assert (merged(tokens).logits - megatron).abs().max() < 1e-4
    from safetensors.torch import load_file

    before, after = load_file(hf / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    expert = "model.layers.0.mlp.experts.5.gate_proj.weight"  # on the second EP rank
    assert not torch.equal(before[expert], after[expert])  # the experts' adapters were trained and merged


def test_adapter_only_checkpoint_resumes_exactly(tmp_path, tiny_hf):
    steps = [*LORA, "train.lr=1e-2", "train.global_batch_size=4", "train.micro_batch_size=1"]
    run_train(2, _base(tiny_hf, tmp_path / "whole", *steps, "train.train_iters=4", "parallel.tp=2"))
    broken = tmp_path / "broken"
    run_train(2, _base(tiny_hf, broken, *steps, "train.train_iters=2", "train.lr_decay_iters=4", "parallel.tp=2"))
    meta = json.loads(next((broken / "checkpoints").glob("iter_*/megatron_swift.json")).read_text())
    assert meta["adapter_only"]
    proc = run_train(2, _base(tiny_hf, broken, *steps, "train.train_iters=4", "parallel.tp=2"))
    assert "resumed from" in proc.stdout
    whole = {r["iteration"]: r["loss"] for r in read_metrics(tmp_path / "whole")}
    resumed = {r["iteration"]: r["loss"] for r in read_metrics(broken)}
    assert resumed == whole


def test_frozen_parameters_stay_bitwise_and_trainable_regex_ones_change(tmp_path, tiny_hf):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    # PP=2: layers 0-1 live on the first stage, so the regexes are matched on global names across stages.
    run_train(2, _base(tiny_hf, run, "parallel.pp=2", "train.train_iters=3", "train.lr=1e-2",
                       r"train.freeze_regex=^decoder\.layers\.(0|1)\.", "train.freeze=[embedding]",
                       r"train.trainable_regex=^decoder\.layers\.1\.self_attention\.linear_qkv\.weight$"))
    proc = subprocess.run(["python", str(CONVERT), "--ckpt", str(run), "--out", str(tmp_path / "hf")], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = load_file(tiny_hf / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    for name in before:
        frozen = name.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens."))
        picked = name.startswith("model.layers.1.self_attn.") and name.split(".")[-2] in ("q_proj", "k_proj", "v_proj")
        if frozen and not picked:
            assert name not in changed, name
    assert {f"model.layers.1.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")} <= changed
    assert "model.layers.3.mlp.down_proj.weight" in changed and "lm_head.weight" in changed


def test_a_pattern_that_matches_nothing_lists_real_names(tmp_path, tiny_hf):
    proc = run_train(1, _base(tiny_hf, tmp_path / "run", "train.train_iters=1", "train.freeze_regex=^nothing\\."),
                     check=False)
    assert proc.returncode != 0
    assert "train.freeze_regex='^nothing\\\\.' matches no parameter; names look like: embedding.word_embeddings" \
        in proc.stdout + proc.stderr
