"""WandB offline files and TensorBoard events hold the scalars the run logged (read back here)."""
from __future__ import annotations

import glob
import json

import pytest

from tests.conftest import read_metrics, run_train
from tests.wandb_records import read_config, read_history


def test_wandb_offline_and_tensorboard_files_hold_logged_scalars(tmp_path):
    # Exactly one global batch of 8 windows of 32 tokens (4 rows x (64 bytes + end of document) = 260 tokens:
    # (260 - 1) // 32 = 8), read in order: every step trains on the same 8 windows, and evaluation on the same file
    # sees them too.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": (f"row {i}: the cat sat on the mat. " * 3)[:64]}) + "\n"
                              for i in range(4)))
    out = tmp_path / "run"
    run_train(2, ["+model=qwen3", f"data.path=[{corpus}]", "train.train_iters=4", "train.max_epochs=null",
                  "train.seq_length=32", "train.global_batch_size=8", "data.shuffle=false", "parallel.tp=2",
                  f"train.output_dir={out}", "logging.wandb.project=swift-test",
                  "logging.wandb.mode=offline", "logging.wandb.tags=[ci]", "logging.tensorboard=true",
                  f"data.eval_path=[{corpus}]", "train.eval_interval=2", "train.eval_iters=2"])
    steps = read_metrics(out)
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    assert [r["consumed_samples"] for r in steps] == [8, 16, 24, 32]
    losses = [r["loss"] for r in steps]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tb_loss = events.Scalars("train/loss")
    assert [e.step for e in tb_loss] == [1, 2, 3, 4]
    assert [e.value for e in tb_loss] == pytest.approx(losses, rel=1e-6)
    for tag in ("lr", "grad_norm", "tokens_per_s", "tflops_per_device", "memory_gib"):
        scalars = events.Scalars(f"train/{tag}")
        assert [e.step for e in scalars] == [1, 2, 3, 4], tag
        assert [e.value for e in scalars] == pytest.approx([r[tag] for r in steps], rel=1e-6), tag
    assert steps[0]["lr"] > steps[-1]["lr"] > 0 and all(r["grad_norm"] > 0 for r in steps)  # not constant figures

    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert [e["iteration"] for e in evals] == [2, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([e["eval_loss"] for e in evals])
    # The evaluation after step 2 sees the 8 windows step 3 then trains on, with the same weights (no dropout):
    # the same loss. After two more steps on those windows, a lower one.
    assert evals[0]["eval_loss"] == pytest.approx(losses[2], abs=1e-5)
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]

    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = [row for row in read_history(run_file) if "train/loss" in row]
    assert [row["_step"] for row in history] == [1, 2, 3, 4]
    assert [row["train/loss"] for row in history] == pytest.approx(losses, rel=1e-9)
    assert all("train/lr" in row and "train/tokens_per_s" in row for row in history)
    config = read_config(run_file)
    assert config["parallel"]["tp"] == 2  # the resolved config went into the run
    assert config["model"]["family"] == "qwen3"
