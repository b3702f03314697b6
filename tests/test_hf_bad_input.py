"""A broken HF folder stops the run with one message that names the problem, and leaves no checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, TRAIN, train_env
from tests.multiproc.test_hf_load import _save_tiny  # imports transformers: missing, the suite fails, not skips

HF_TO_MCORE = ROOT / "tools" / "convert" / "hf_to_mcore.py"


def _tiny_qwen3(folder):
    _save_tiny("qwen3", folder, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


BREAKAGES = {
    "unexpected": (lambda f: _edit_tensors(f, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.ones(4)})),
                   "1 tensors in the checkpoint are not used by the model"),
    "missing": (lambda f: _edit_tensors(f, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight")),
                "tensor 'model.layers.1.self_attn.k_norm.weight' is missing from the checkpoint"),
    # A download cut short: safetensors' own reader error (SafetensorError) used to come out as a traceback.
    "truncated": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-4096]),
                  "model.safetensors: cannot read this safetensors file"),
    "shape": (lambda f: _edit_config(f, intermediate_size=96),
              "shape mismatch for 'model.layers.0.mlp.gate_proj.weight, model.layers.0.mlp.up_proj.weight' -> "
              "'decoder.layers.0.mlp.linear_fc1.weight': expected (192, 64) on this rank, found (256, 64)"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_checkpoint_names_the_tensor(tmp_path, breakage):
    hf, out = tmp_path / "hf", tmp_path / "out"
    _tiny_qwen3(hf)
    breaks, message = BREAKAGES[breakage]
    breaks(hf)
    proc = subprocess.run([sys.executable, str(TRAIN), "+model=qwen3", f"model.pretrained={hf}", "train.device=cpu",
                           "train.train_iters=0", f"train.output_dir={out}", "logging.tensorboard=false"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and str(hf) in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists()


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    hf = tmp_path / "hf"
    _tiny_qwen3(hf)
    _edit_config(hf, architectures=["GPT2LMHeadModel"])
    proc = subprocess.run([sys.executable, str(HF_TO_MCORE), "--hf", str(hf), "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "architectures ['GPT2LMHeadModel'] are not supported; supported: " in proc.stderr
    for supported in ("Qwen3MoeForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Glm4MoeForCausalLM"):
        assert supported in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unsupported_rope_type_is_one_line_naming_the_key(tmp_path):
    """dynamic (and longrope: tests/test_rope.py) RoPE stops the run before any model is built."""
    hf, out = tmp_path / "hf", tmp_path / "out"
    _tiny_qwen3(hf)
    _edit_config(hf, rope_scaling={"type": "dynamic", "factor": 2.0})
    proc = subprocess.run([sys.executable, str(TRAIN), "+model=qwen3", f"model.pretrained={hf}", "train.device=cpu",
                           "train.train_iters=0", f"train.output_dir={out}", "logging.tensorboard=false"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"megatron-swift: error: {hf / 'config.json'}: rope_scaling.type='dynamic' is not supported; supported RoPE "
        "types: default, linear, llama3, yarn"]
    assert not out.exists()
