"""A resume never changes the run: SIGKILL after a checkpoint, train.resume=auto, same losses bitwise."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from tests.conftest import ROOT, launch_cmd, read_metrics, run_train, train_env

TOTAL = 40
# DP=2 with the distributed optimizer (sharded optimizer state), warmup + cosine
# (scheduler state) and dropout on (RNG state): every piece of state must come back.
CONFIG = ["+model=qwen3", "train.precision=fp32", f"train.train_iters={TOTAL}", "train.seq_length=64",
          "train.global_batch_size=8", "train.micro_batch_size=2", "train.lr_warmup_iters=5",
          "parallel.distributed_optimizer=true", "model.hidden_dropout=0.1", "train.save_interval=5",
          "train.keep_last=2", "logging.tensorboard=false", "train.device=cpu"]


def _last_per_step(output_dir):
    rows = {}
    for row in read_metrics(output_dir):
        rows[row["iteration"]] = row  # a resumed run re-logs steps after its checkpoint
    return rows


def _kill_after_checkpoint(output_dir) -> int:
    """Start the run, SIGKILL every process once a checkpoint exists and a later step was logged."""
    proc = subprocess.Popen(launch_cmd(2, [*CONFIG, f"train.output_dir={output_dir}"]), cwd=ROOT, env=train_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = output_dir / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if metrics.exists():
                steps = [json.loads(l)["iteration"] for l in metrics.read_text().splitlines() if l.strip()]
                if steps and steps[-1] >= 7:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return steps[-1]
            assert proc.poll() is None, "run ended before it could be killed"
            time.sleep(0.02)
        raise AssertionError("run made no progress")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    whole = tmp_path / "whole"
    run_train(2, [*CONFIG, f"train.output_dir={whole}"])
    expected = _last_per_step(whole)
    assert sorted(expected) == list(range(1, TOTAL + 1))

    broken = tmp_path / "broken"
    killed_at = _kill_after_checkpoint(broken)
    assert killed_at < TOTAL
    proc = run_train(2, [*CONFIG, f"train.output_dir={broken}", "train.resume=auto"])
    assert "resumed from" in proc.stdout
    resumed = _last_per_step(broken)
    assert sorted(resumed) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        assert resumed[step]["loss"] == expected[step]["loss"], f"step {step} differs after resume"
        assert resumed[step]["lr"] == expected[step]["lr"]
        assert resumed[step]["consumed_samples"] == expected[step]["consumed_samples"]
    with open(broken / "checkpoints" / f"iter_{TOTAL:07d}" / "megatron_swift.json") as f:
        assert json.load(f)["iteration"] == TOTAL
    kept = sorted(p.name for p in (broken / "checkpoints").iterdir() if p.name.startswith("iter_"))
    assert kept == [f"iter_{TOTAL - 5:07d}", f"iter_{TOTAL:07d}"]  # keep_last=2
