"""WandB offline files and TensorBoard events hold the scalars the run logged (read back here)."""
from __future__ import annotations

import glob
import json

import pytest

from tests.conftest import read_metrics, run_train
from tests.wandb_records import read_config, read_history


def test_wandb_offline_and_tensorboard_files_hold_logged_scalars(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    run_train(2, ["+model=qwen3", f"data.path=[{tiny_corpus}]", "train.train_iters=4", "train.seq_length=32",
                  "parallel.tp=2", f"train.output_dir={out}", "logging.wandb.project=swift-test",
                  "logging.wandb.mode=offline", "logging.wandb.tags=[ci]", "logging.tensorboard=true",
                  f"data.eval_path=[{tiny_corpus}]", "train.eval_interval=2", "train.eval_iters=2"])
    steps = read_metrics(out)
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    losses = [r["loss"] for r in steps]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tb_loss = events.Scalars("train/loss")
    assert [e.step for e in tb_loss] == [1, 2, 3, 4]
    assert [e.value for e in tb_loss] == pytest.approx(losses, rel=1e-6)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/tflops_per_device", "train/memory_gib"):
        assert len(events.Scalars(tag)) == 4, tag

    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in l]
    assert [e["iteration"] for e in evals] == [2, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]
    assert [e.value for e in events.Scalars("eval/loss")] == pytest.approx([e["eval_loss"] for e in evals])
    # evaluated on the training corpus, after the step: close to that step's training loss
    assert abs(evals[-1]["eval_loss"] - losses[3]) < 0.3

    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = [row for row in read_history(run_file) if "train/loss" in row]
    assert [row["_step"] for row in history] == [1, 2, 3, 4]
    assert [row["train/loss"] for row in history] == pytest.approx(losses, rel=1e-9)
    assert all("train/lr" in row and "train/tokens_per_s" in row for row in history)
    config = read_config(run_file)
    assert config["parallel"]["tp"] == 2  # the resolved config went into the run
    assert config["model"]["family"] == "qwen3"
