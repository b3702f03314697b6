"""HF -> Megatron -> HF is bitwise; a trained, exported model loads in transformers with Megatron's logits."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import transformers  # a test dependency (setup.py [test]): missing, the suite must fail, not skip
from safetensors.torch import load_file, save_file

from megatron_swift.convert.safetensors_io import current_umask

from tests.conftest import ROOT, free_port, launch_cmd, run_train, train_env
from tests.multiproc.test_hf_load import (CASES, DEEPSEEK, MOE_MODELS, ROPE_MODELS, TEXT_MODELS, VOCAB, WORKER,
                                          _save_tiny, _v4_spelling)

CONVERT = ROOT / "tools" / "convert" / "mcore_to_hf.py"
HF_TO_MCORE = ROOT / "tools" / "convert" / "hf_to_mcore.py"
CHECK = ROOT / "tools" / "convert" / "check.py"
# Fields transformers rewrites on every save, not part of the model.
VOLATILE = {"transformers_version", "torch_dtype", "dtype"}


def _export(run_dir, out_dir, *extra):
    proc = subprocess.run([sys.executable, str(CONVERT), "--ckpt", str(run_dir), "--out", str(out_dir), *extra],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _tensors(folder):
    """Every tensor of an HF folder, single-file or sharded (through its index)."""
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    out = {}
    for file in files:
        out.update(load_file(folder / file))
    return out


def _config(folder):
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in VOLATILE}


def _run_tool(nproc, script, args):
    proc = subprocess.run(launch_cmd(nproc, args, script=script), cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("case,via,dtype", [
    ("qwen3-tp2", "train", torch.float32),
    ("qwen2-tied-tp2", "tool", torch.float32),
    # Experts sharded over EP=2, weights kept in bf16 end to end, export split into many small files.
    ("qwen3_moe-ep2", "tool", torch.bfloat16),
    # Llama 3.1-style RoPE scaling written as transformers 4.x did: config.json comes back as written.
    ("llama3-rope-v4", "tool", torch.float32),
    # DeepSeek-V3: MLA, a dense first layer then MoE layers (stored per layer), the router's correction bias.
    ("deepseek-v3-ep2", "tool", torch.float32),
])
def test_round_trip_is_bitwise(tmp_path, case, via, dtype):
    others = {"llama3-rope-v4": ("llama", ROPE_MODELS["llama3"][2], 2, ["parallel.tp=2"]),
              "deepseek-v3-ep2": (*DEEPSEEK["v3"], 2, ["parallel.ep=2"])}
    kind, extra, nproc, layout = CASES.get(case) or others[case]
    hf_dir, run, out = tmp_path / "hf", tmp_path / "run", tmp_path / "out"
    _save_tiny(kind, hf_dir, dtype=dtype, **extra)
    if case.endswith("-v4"):
        _v4_spelling(hf_dir)
    if case.startswith("deepseek"):
        _edit_tensors(hf_dir, _add_mtp_layer)  # built as an MTP layer; its embedding / head copies kept as they are
    # Loaded under TP=2 (or EP=2) and saved sharded; the export reshards to one process.
    if via == "train":
        run_train(nproc, [f"+model={kind}", f"model.pretrained={hf_dir}", "train.precision=fp32",
                          "train.train_iters=0", f"train.output_dir={run}", "logging.tensorboard=false", *layout])
    else:
        tool_layout = ["--ep", "2"] if "ep=2" in " ".join(layout) else ["--tp", "2"]
        _run_tool(2, HF_TO_MCORE, ["--hf", str(hf_dir), "--out", str(run), *tool_layout, "train.device=cpu"])
    sharded = dtype == torch.bfloat16
    _export(run, out, *(["--max-shard-gb", "0.0001"] if sharded else []))
    if sharded:
        assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    # readable by the next user of a shared folder: the umask's mode, as the export's other files (was 0600)
    assert {oct(p.stat().st_mode & 0o777) for p in out.glob("*.safetensors")} == {oct(0o666 & ~current_umask())}
    original, exported = load_file(hf_dir / "model.safetensors"), _tensors(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert _config(out) == _config(hf_dir)
    if case.endswith("-v4"):
        assert _config(out)["rope_scaling"]["type"] == "llama3" and "rope_parameters" not in _config(out)


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _add_mtp_layer(tensors):
    """A multi-token-prediction layer as DeepSeek-V3 stores it after the decoder's (num_nextn_predict_layers=1):
    a decoder layer (here the last one's values) plus enorm, hnorm, eh_proj and a shared head."""
    n = 1 + max(int(name.split(".")[2]) for name in tensors if name.startswith("model.layers."))
    last, h = f"model.layers.{n - 1}.", tensors["model.norm.weight"].shape[0]
    mtp = {name.replace(last, f"model.layers.{n}."): t.clone() for name, t in tensors.items() if name.startswith(last)}
    g = torch.Generator().manual_seed(4)
    mtp.update({f"model.layers.{n}.{k}": torch.randn(*shape, generator=g) for k, shape in (
        ("enorm.weight", (h,)), ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
        ("shared_head.norm.weight", (h,)), ("shared_head.head.weight", (VOCAB, h)),
        ("embed_tokens.weight", (VOCAB, h)))})
    tensors.update(mtp)


def test_trained_export_loads_in_transformers_with_megatron_logits(tmp_path):
    kind, extra, nproc, layout = CASES["qwen3-tp2"]
    hf_dir, run = tmp_path / "hf", tmp_path / "run"
    _save_tiny(kind, hf_dir, **extra)
    base = [f"+model={kind}", f"model.pretrained={hf_dir}", "train.precision=fp32", "logging.tensorboard=false",
            "train.device=cpu"]
    run_train(nproc, [*base, "train.train_iters=3", "train.lr=1e-2", f"train.output_dir={run}", "train.save_hf=true",
                      *layout])
    out = run / "hf" / "iter_0000003"  # written by train.save_hf
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = subprocess.run(launch_cmd(nproc, [str(tmp_path / "tokens.pt"), str(tmp_path / "mcore.pt"), *base,
                                             f"model.load={run}", f"train.output_dir={tmp_path / 'eval'}", *layout],
                                     script=WORKER), cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    padded = torch.load(tmp_path / "mcore.pt", weights_only=True)
    assert padded.shape[-1] == 512 and torch.isneginf(padded[..., VOCAB:]).all()  # 300 padded for TP=2, masked
    megatron = padded[..., :VOCAB]
    trained = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits, before = trained(tokens).logits, original(tokens).logits
    assert (hf_logits - megatron).abs().max().item() < 1e-4
    assert (hf_logits - before).abs().max().item() > 1e-3  # the exported weights are the trained ones


@pytest.mark.parametrize("case", ["qwen3-tp2", "glm4_moe-ep2", "olmo2-tp2", "phi3-tp2"])
def test_check_tool_reports_logit_agreement(tmp_path, case):
    """The check users run on a folder (the issue's GLM-4.5 command: parallel.ep=2)."""
    if case == "glm4_moe-ep2":
        (kind, extra), layout = MOE_MODELS["glm4_moe"], ["parallel.ep=2"]
    elif case in ("olmo2-tp2", "phi3-tp2"):
        (kind, extra), layout = TEXT_MODELS[case.split("-")[0]], ["parallel.tp=2"]
    else:
        kind, extra, _, _ = CASES[case]
        layout = ["parallel.tp=2"]
    _save_tiny(kind, tmp_path / "hf", **extra)
    report = tmp_path / "report.json"
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(CHECK),
           "--hf", str(tmp_path / "hf"), "--report", str(report), *layout, "train.device=cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(report.read_text())
    assert figures["max_abs_diff"] < 1e-4 and figures["token_agreement"] == 1.0
    # Its one line, not a training run's lines, and nothing left behind in the temporary folder.
    assert [line for line in proc.stdout.splitlines() if line.strip()] == [
        line for line in proc.stdout.splitlines() if line.startswith("logits vs HF: mean |diff|")]
    assert "logits vs HF: mean |diff|" in proc.stdout and "run folder" not in proc.stdout
    assert not (Path(tempfile.gettempdir()) / f"swift-check-{port}").exists()
