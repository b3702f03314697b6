"""train.max_epochs on a dataset of known size performs the documented number of steps (DP=2)."""
from __future__ import annotations

import json

from tests.conftest import read_metrics, run_train

SEQ, GBS = 32, 8


def _expected_steps_per_epoch(corpus) -> int:
    # By hand, from docs: byte tokenizer = UTF-8 bytes + one end-of-document token per row;
    # samples = (tokens - 1) // seq_length; steps per epoch = samples // global_batch_size.
    tokens = sum(len(json.loads(line)["text"].encode("utf-8")) + 1 for line in corpus.read_text().splitlines())
    return ((tokens - 1) // SEQ) // GBS


def _ckpts(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_max_epochs_sets_the_number_of_steps(tmp_path, tiny_corpus):
    per_epoch = _expected_steps_per_epoch(tiny_corpus)
    assert per_epoch > 10
    common = ["+model=qwen3", f"data.path=[{tiny_corpus}]", f"train.seq_length={SEQ}",
              f"train.global_batch_size={GBS}", "train.micro_batch_size=2", "logging.tensorboard=false",
              "train.keep_last=0", "logging.log_interval=1"]
    out = tmp_path / "two_epochs"
    proc = run_train(2, [*common, "train.max_epochs=2", f"train.output_dir={out}"])
    rows = read_metrics(out)
    assert rows[-1]["iteration"] == 2 * per_epoch
    assert rows[-1]["consumed_samples"] == 2 * per_epoch * GBS
    assert rows[-1]["epoch"] == 2.0
    assert f"{per_epoch} steps/epoch" in proc.stdout
    assert f"epoch 1 done at step {per_epoch}" in proc.stdout
    # save_at_epoch_end: one checkpoint per epoch boundary, the last one doubling as the final save
    assert _ckpts(out) == [f"iter_{per_epoch:07d}", f"iter_{2 * per_epoch:07d}"]

    # Whichever limit comes first stops the run.
    out = tmp_path / "iters_first"
    run_train(2, [*common, "train.max_epochs=2", f"train.train_iters={per_epoch + 3}", f"train.output_dir={out}"])
    assert read_metrics(out)[-1]["iteration"] == per_epoch + 3
