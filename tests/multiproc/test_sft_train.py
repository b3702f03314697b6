"""SFT with packing trains under DP=2 and resumes at the exact data position."""
from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_train

# Constant LR, so that a run of 3 steps followed by a resume to 6 follows the same schedule as 6 at once.
CONFIG = ["+model=qwen3", "data=sft", "data.packing=true", "train.seq_length=256", "train.precision=fp32",
          "train.global_batch_size=4", "train.micro_batch_size=1", "train.lr_decay_style=constant",
          "train.save_interval=3", "logging.tensorboard=false", "train.device=cpu"]


def _losses(output_dir):
    return {row["iteration"]: row for row in read_metrics(output_dir)}


@pytest.mark.parametrize("streaming", [False, True])
def test_sft_packed_run_resumes_at_the_same_samples(tmp_path, streaming):
    whole, split = tmp_path / "whole", tmp_path / "split"
    # Streaming: small buffers so that the checkpoint holds buffered lines and pending packed rows.
    config = CONFIG + (["data.streaming=true", "data.stream_buffer=20", "data.pack_window=6"] if streaming else [])
    proc = run_train(2, [*config, "train.train_iters=6", f"train.output_dir={whole}"])
    assert ("sft stream:" if streaming else "% filled") in proc.stdout
    run_train(2, [*config, "train.train_iters=3", f"train.output_dir={split}"])
    resumed = run_train(2, [*config, "train.train_iters=6", f"train.output_dir={split}", "train.resume=auto"])
    assert "resumed from" in resumed.stdout
    expected, got = _losses(whole), _losses(split)
    for step in range(1, 7):
        assert got[step]["loss"] == expected[step]["loss"], f"step {step}"
        assert got[step]["consumed_samples"] == expected[step]["consumed_samples"] == 4 * step
