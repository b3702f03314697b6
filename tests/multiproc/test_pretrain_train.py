"""data=pretrain: a weighted blend of preprocessed indexed datasets trains under DP=2 (indices built once)."""
from __future__ import annotations

import math
import sys

from tests.conftest import ROOT, read_metrics, run_train

sys.path.insert(0, str(ROOT / "tools"))
from preprocess_data import preprocess  # noqa: E402


def test_weighted_indexed_blend_trains(tmp_path):
    corpus = str(ROOT / "megatron_swift" / "assets" / "demo_corpus.jsonl")
    preprocess([corpus], str(tmp_path / "a"), "byte", workers=1)
    preprocess([corpus], str(tmp_path / "b"), "byte", workers=1)
    run = tmp_path / "run"
    proc = run_train(2, ["+model=qwen3", "data=pretrain", f"data.path=[{tmp_path / 'a'},{tmp_path / 'b'}]",
                         "data.weights=[0.8,0.2]", "data.tokenizer=byte", "train.train_iters=4", "train.device=cpu",
                         f"train.output_dir={run}", "logging.tensorboard=false"])
    assert "x0.8" in proc.stdout and "32 samples" in proc.stdout  # 4 steps x global batch 8
    rows = read_metrics(run)
    assert [r["consumed_samples"] for r in rows] == [8, 16, 24, 32]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert list((run / "data_cache").rglob("*.npy"))  # megatron-core's cached indices
