"""Packing changes nothing a sample sees: per-token losses packed equal those computed one sample per row."""
from __future__ import annotations

import subprocess

import pytest
import torch

from tests.conftest import ROOT, launch_cmd, train_env

WORKER = ROOT / "tests" / "multiproc" / "sft_loss_worker.py"


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tp=2"]), (2, ["parallel.cp=2"])],
                         ids=["one-rank", "tp2", "cp2-a2a"])
def test_packed_losses_equal_unpacked(tmp_path, nproc, layout):
    out = tmp_path / "losses.pt"
    # The first 24 rows of the bundled SFT set (1-3 turns, three row shapes), byte tokenizer, plain template.
    data = tmp_path / "sft.jsonl"
    data.write_text("".join((ROOT / "megatron_swift" / "assets" / "demo_sft.jsonl").read_text().splitlines(True)[:24]))
    overrides = ["+model=qwen3", "data=sft", f"data.path=[{data}]", "train.seq_length=256", "train.precision=fp32",
                 "train.device=cpu", f"train.output_dir={tmp_path / 'run'}", "logging.tensorboard=false",
                 "model.hidden_dropout=0.0", "model.attention_dropout=0.0", *layout]
    proc = subprocess.run(launch_cmd(nproc, [str(out), *overrides], script=WORKER), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = torch.load(out, weights_only=True)
    unpacked, packed = result["unpacked"], result["packed"]
    assert sorted(unpacked) == sorted(packed) == list(range(24))
    assert result["rows"] < 12  # rows really hold several samples
    for sample, losses in unpacked.items():
        diff = (losses - packed[sample]).abs().max().item()
        assert diff < 1e-5, f"sample {sample}: max |loss diff| {diff}"
