"""What an operator meets: a run that diverges, damaged checkpoints, changed flags on resume, a rank killed
while it writes. Each test starts from what the trainer wrote to disk and looks at it as a user would."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, launch_cmd, read_metrics, train_env
from tests.multiproc import procs

BASE = ["+model=qwen3", "train.precision=fp32", "train.seq_length=64", "train.global_batch_size=8",
        "train.micro_batch_size=2", "train.lr=1e-3", "train.lr_decay_style=constant", "train.lr_decay_iters=12",
        "train.save_interval=3", "train.keep_last=3", "logging.tensorboard=false",
        "parallel.distributed_optimizer=true"]


def error_lines(text: str):
    return [line for line in text.splitlines() if line.startswith("megatron-swift: error:")]


def failing(overrides, cwd=ROOT):
    """Run a command expected to fail; returns (torchrun's output, the one error line)."""
    proc = subprocess.run(launch_cmd(2, [*overrides, "train.device=cpu"]), cwd=cwd, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-4000:]
    # torchrun's own report names that line as the root cause, with the worker's exit code.
    assert re.search(r"exitcode\s*:\s*[23] ", proc.stderr) and f"traceback : {lines[0]}" in proc.stderr
    return proc.stdout + proc.stderr, lines[0]


def manifest_intact(ckpt) -> bool:
    meta = json.loads((ckpt / "megatron_swift.json").read_text())
    return all(hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == digest and
               (ckpt / name).stat().st_size == size for name, (size, digest) in meta["manifest"].items())


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """9 steps, checkpoints at 3, 6, 9 (each a module-wide original; tests work on copies)."""
    out = tmp_path_factory.mktemp("base") / "run"
    procs.run(2, [*BASE, "train.train_iters=9", f"train.output_dir={out}"])
    return out


@pytest.fixture
def run_copy(base_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def test_diverging_run_stops_and_keeps_finite_checkpoints(tmp_path):
    """lr 1e4: the loss and gradients blow up. The bad steps are skipped, the run stops (exit 3 in the
    worker) after train.max_skipped_steps of them, and every checkpoint left is intact and finite."""
    out = tmp_path / "run"
    log, line = failing(["+model=qwen3", "train.lr=1e4", "train.lr_warmup_iters=16", "train.save_interval=2",
                         "train.train_iters=40", "logging.tensorboard=false", f"train.output_dir={out}"])
    assert "training diverged: 3 consecutive steps skipped" in line
    rows = read_metrics(out)
    assert [r["skipped"] for r in rows[-3:]] == [True] * 3 and rows[-1]["iteration"] < 40
    kept = sorted((out / "checkpoints").glob("iter_*"))
    assert len(kept) == 2 and all(manifest_intact(c) for c in kept)
    # No checkpoint is saved while steps are being skipped, and the message names one from before the streak.
    skipped = {r["iteration"] for r in rows if r["skipped"]}
    assert not {int(c.name[5:]) for c in kept} & skipped
    named = re.search(r"Resume from (\S+iter_(\d+)) \(saved before the skipped steps\)", line)
    assert named and named.group(1) == str(kept[-1]) and int(named.group(2)) < rows[-3]["iteration"]
    export = subprocess.run([sys.executable, str(ROOT / "tools" / "convert" / "mcore_to_hf.py"),
                                   "--ckpt", str(kept[-1]), "--out", str(tmp_path / "hf")],
                                  capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    from safetensors.torch import load_file

    tensors = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert tensors and all(bool(v.isfinite().all()) for v in tensors.values())


@pytest.mark.parametrize("damage", ["flipped shard bytes", "truncated .metadata", "unreadable record"])
def test_damaged_latest_checkpoint_is_named_and_the_previous_one_used(base_run, run_copy, damage):
    latest = run_copy / "checkpoints" / "iter_0000009"
    if damage == "flipped shard bytes":
        shard = max(latest.glob("__*.distcp"), key=lambda p: p.stat().st_size)
        data = bytearray(shard.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0xFF
        shard.write_bytes(bytes(data))
        problem = f"{shard.name} does not match its checksum"
    elif damage == "truncated .metadata":
        meta = latest / ".metadata"
        meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
        problem = ".metadata has"
    else:
        (latest / "megatron_swift.json").write_text('{"iteration": 9, "compl')
        problem = "cannot read megatron_swift.json"
    proc = procs.run(2, [*BASE, "train.train_iters=12", f"train.output_dir={run_copy}"])
    if damage != "unreadable record":  # an unreadable record is not a complete checkpoint to begin with
        assert f"checkpoint {latest} is damaged ({problem}" in proc.stdout, proc.stdout[-3000:]
        assert (run_copy / "checkpoints" / "iter_0000009.corrupt").is_dir()
    assert f"resumed from {run_copy / 'checkpoints' / 'iter_0000006'} at step 6" in proc.stdout
    resumed = {r["iteration"]: r for r in read_metrics(run_copy)}
    original = {r["iteration"]: r for r in read_metrics(base_run)}
    for step in (7, 8, 9):  # the same steps again, from the intact checkpoint: the same numbers
        assert resumed[step]["loss"] == original[step]["loss"] and resumed[step]["lr"] == original[step]["lr"]
    assert max(resumed) == 12 and manifest_intact(run_copy / "checkpoints" / "iter_0000012")


def test_resume_with_a_changed_global_batch_is_refused_naming_the_key(run_copy):
    before = {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")}
    _, line = failing([*BASE, "train.train_iters=12", "train.global_batch_size=16", f"train.output_dir={run_copy}"])
    assert "train.global_batch_size: 8 -> 16" in line and f"cannot resume from {run_copy}" in line
    assert {p: p.stat().st_mtime_ns for p in run_copy.rglob("*")} == before  # nothing written


def test_resume_with_a_changed_data_file_is_refused(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the corpus, with some words."}) + "\n"
                            for i in range(120)))
    out = tmp_path / "run"
    overrides = [*BASE, "train.train_iters=4", f"data.path={data}", f"train.output_dir={out}"]
    procs.run(2, overrides)
    with open(data, "a") as f:
        f.write(json.dumps({"text": "one more line"}) + "\n")
    _, line = failing([*overrides[:-2], "train.train_iters=6", f"data.path={data}", f"train.output_dir={out}"])
    assert f"data file {data}: contents changed" in line


def test_resume_with_a_changed_learning_rate_applies_it(run_copy):
    proc = procs.run(2, [*BASE, "train.train_iters=12", "train.lr=2e-3", f"train.output_dir={run_copy}"])
    assert "resuming with a changed setting, applied from this step on: train.lr: 0.001 -> 0.002" in proc.stdout
    rows = {r["iteration"]: r for r in read_metrics(run_copy)}
    assert [rows[s]["lr"] for s in (9, 10, 11, 12)] == [1e-3, 2e-3, 2e-3, 2e-3]  # constant schedule


def test_resume_under_another_layout_is_one_line(run_copy):
    _, line = failing([*BASE, "train.train_iters=12", "parallel.tp=2", "train.global_batch_size=8",
                       f"train.output_dir={run_copy}"])
    assert "was saved with layout world=2 tp=1" in line and "but this run uses world=2 tp=2" in line
    assert "model.load=" in line


def test_saves_fork_no_writer_or_helper_process(tmp_path):
    """megatron-core's saver would fork writer processes at every save, from a rank with dozens of threads (a
    fork that can inherit a held lock and hang for good), and spawn a results-queue manager: the rank writes
    with its own threads instead (training/ckpt_writer.py), so no process of its own outlives a killed rank."""
    out = tmp_path / "run"
    proc = procs.start(2, [*BASE, "train.train_iters=400", "train.save_interval=1", f"train.output_dir={out}"])
    try:
        procs.wait_until(proc, lambda: len(list((out / "checkpoints").glob("iter_*"))) >= 2)
        workers = psutil.Process(proc.pid).children()
        newest = lambda: max(int(p.name[5:]) for p in (out / "checkpoints").glob("iter_*"))  # noqa: E731
        first = newest()
        for _ in range(600):  # a save every step: sample the ranks' children across several saves
            assert not [c for w in workers for c in w.children(recursive=True)]
            time.sleep(0.005)
        assert newest() > first  # saves happened while we looked
    finally:
        procs.kill_tree(proc.pid)
    time.sleep(0.1)


def test_a_second_run_in_a_folder_in_use_is_refused_and_the_first_goes_on(tmp_path):
    """Two launches with one train.output_dir: the second stops with one line naming the folder and the first
    run's process (exit 2), before writing anything there; the first is untouched."""
    out = tmp_path / "run"
    command = [*BASE, "train.train_iters=400", f"train.output_dir={out}"]
    first = procs.start(2, command)
    try:
        procs.wait_until(first, lambda: procs.last_step(procs.metrics_file(out)) >= 1)
        _, line = failing(command)
        assert f"run folder {out} is in use by another run (pid " in line and "launch/train.py" in line
        assert first.poll() is None
    finally:
        procs.kill_tree(first.pid)


def test_time_budget_stops_with_a_checkpoint(tmp_path):
    """train.exit_duration_minutes: the run stops after the step in which the budget ran out, saves, exits 0."""
    out = tmp_path / "run"
    proc = procs.run(2, [*BASE, "train.train_iters=50", "train.exit_duration_minutes=0.0001",
                         f"train.output_dir={out}"])
    stopped = re.search(r"stopped by train.exit_duration_minutes reached at step (\d+) of 50", proc.stdout)
    assert stopped, proc.stdout[-2000:]
    step = int(stopped.group(1))
    assert step < 50 and manifest_intact(out / "checkpoints" / f"iter_{step:07d}")
