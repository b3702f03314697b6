"""The first step's loss and gradient are the global-batch ones whatever the micro-batch split.

SFT: the loss is the mean over every loss-carrying token of the global batch (not the mean of per-micro-batch
means); DPO: the mean over the pairs of the global batch (not over micro-batches). Each is checked against the
figure written out by hand in grad_worker.py (autograd on the whole global batch at once), for micro-batch sizes
1, 2 and 4 of the same global batch of 8 under DP=2 (4, 2 and 1 micro-batches per rank): the logged loss, the
logged gradient norm and the gradient itself. The SFT rows carry different numbers of loss tokens, so a split
into micro-batches that were each averaged on their own would give a different gradient.
"""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, launch_cmd, train_env

WORKER = ROOT / "tests" / "multiproc" / "grad_worker.py"
SIZES = [1, 2, 4]
# lr=0: the steps leave the weights unchanged, so each split is compared on the same model; no clipping, so the
# gradient buffers hold the gradient itself.
COMMON = ["train.precision=fp32", "train.device=cpu", "logging.tensorboard=false", "train.global_batch_size=8",
          "train.lr=0", "train.min_lr=0", "train.clip_grad=0", "train.train_iters=1", "train.max_epochs=null"]


def _run(tmp_path, overrides):
    result = tmp_path / "result.json"
    proc = subprocess.run(launch_cmd(2, [str(result), ",".join(map(str, SIZES)), *COMMON, *overrides,
                                         f"train.output_dir={tmp_path / 'run'}"], script=WORKER),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(result.read_text())


def _check(result):
    hand = result["hand"]
    assert hand["grad_norm"] > 1e-3  # a real gradient
    for mbs in SIZES:
        step = result["steps"][str(mbs)]
        assert step["microbatches"] == 8 // (2 * mbs)
        assert step["loss"] == pytest.approx(hand["loss"], rel=1e-6, abs=0), (mbs, step, hand)
        assert step["grad_norm"] == pytest.approx(hand["grad_norm"], rel=1e-5, abs=0), (mbs, step, hand)
        assert step["max_grad_diff"] < 1e-5 * hand["hand_max_grad"], (mbs, step, hand)


def test_sft_gradient_is_the_global_token_mean_for_every_micro_batch_size(tmp_path):
    # Answers of 3 to 48 characters: micro-batches with very different numbers of loss tokens.
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                     {"role": "assistant", "content": "ab" * (1 + 3 * i)}]}) + "\n"
                            for i in range(8)))
    result = _run(tmp_path, ["+model=qwen3", "data=sft", f"data.path=[{data}]", "train.seq_length=96"])
    assert max(result["row_tokens"]) > 4 * min(result["row_tokens"]), result["row_tokens"]
    _check(result)


def test_dpo_gradient_is_the_mean_over_pairs_for_every_micro_batch_size(tmp_path, tiny_hf):
    # beta=0.5, not the default 0.1: the gradient at policy = reference is beta/2 times that of the margin.
    result = _run(tmp_path, ["+model=qwen3", f"model.pretrained={tiny_hf}", "data=prefs", "data.tokenizer=byte",
                             "task=dpo", "task.beta=0.5", "train.seq_length=96"])
    _check(result)
