"""data=pretrain: a weighted blend of preprocessed indexed datasets trains under DP=2 (indices built once)."""
from __future__ import annotations

import math
import sys

import numpy as np

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
    assert f"{tmp_path / 'a'} x0.8, {tmp_path / 'b'} x0.2" in proc.stdout and "4 steps in all" in proc.stdout
    rows = read_metrics(run)
    assert [r["consumed_samples"] for r in rows] == [8, 16, 24, 32]
    # Untrained (init std 0.02): near-uniform over the byte tokenizer's 259 real tokens (padding masked).
    assert abs(rows[0]["loss"] - math.log(259)) < 0.01, rows[0]["loss"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1, [r["loss"] for r in rows]  # and it learns the corpus
    assert all(0 < r["grad_norm"] < 100 for r in rows)
    # megatron-core's cached blend index: the prefix of each sample, 80 % of them from the first (weights in order).
    (index,) = (run / "data_cache").glob("*BlendedDataset-train-dataset_index.npy")
    drawn = np.load(index)
    assert len(drawn) >= 32 and set(drawn.tolist()) == {0, 1}
    assert abs((drawn == 0).mean() - 0.8) < 0.05, np.bincount(drawn)
