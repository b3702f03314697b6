"""A resume never changes the run.

Every process of a run is killed (SIGKILL, workers included) in the middle of
training, after a checkpoint; the same command continues from that checkpoint,
and every step's loss, learning rate and gradient norm equal an uninterrupted
run's bitwise. Dropout (RNG state), warmup + cosine (scheduler state), the
distributed optimizer (sharded Adam state and its step count), TP+SP (the
tensor-parallel RNG tracker), packed streaming SFT (the stream's position) and
MoE routers' expert bias (aux-loss-free balancing moves it every step) all have to come back for that to hold.
"""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import read_metrics
from tests.multiproc import procs

TOTAL = 24
COMMON = ["+model=qwen3", "train.precision=fp32", f"train.train_iters={TOTAL}", "train.seq_length=64",
          "train.lr_warmup_iters=3", "train.lr=1e-3", "model.hidden_dropout=0.1", "model.attention_dropout=0.1",
          "train.save_interval=4", "train.keep_last=2", "logging.tensorboard=false"]
LAYOUTS = {
    # DP=2, optimizer state sharded over the two ranks.
    "dp2_distopt": ["parallel.distributed_optimizer=true", "train.global_batch_size=8", "train.micro_batch_size=2"],
    # TP=2 with sequence parallelism: dropout draws from the tensor-parallel RNG tracker.
    "tp2_sp": ["parallel.tp=2", "parallel.sp=true", "train.global_batch_size=4", "train.micro_batch_size=2"],
    # Packed SFT rows from a stream: each rank's reader position, shuffle buffer and pending rows.
    "sft_packed_stream": ["data=sft", "data.packing=true", "data.streaming=true", "data.stream_buffer=16",
                          "data.pack_window=8", "train.seq_length=256", "parallel.distributed_optimizer=true",
                          "train.global_batch_size=4", "train.micro_batch_size=1"],
    # The same stream with context parallelism: both ranks of the CP group read the same rows and keep
    # their halves of each; the distributed optimizer shards over the DP x CP group.
    "cp2_sft_packed_stream": ["data=sft", "data.packing=true", "data.streaming=true", "data.stream_buffer=16",
                              "data.pack_window=8", "train.seq_length=256", "parallel.distributed_optimizer=true",
                              "parallel.cp=2", "train.global_batch_size=4", "train.micro_batch_size=1"],
    # MoE with aux-loss-free balancing (DeepSeek-V3 style: sigmoid routing, a shared expert, a dense first layer)
    # under EP=2: the routers' expert bias is a buffer the trainer moves every step (megatron-core's
    # finalize_model_grads), not the optimizer; it must come back with the checkpoint, or routing changes.
    "moe_expert_bias_ep2": ["model.moe_expert_bias_update_rate=0.01", "parallel.ep=2",
                            "parallel.distributed_optimizer=true", "train.global_batch_size=4",
                            "train.micro_batch_size=2"],
}
MODELS = {"moe_expert_bias_ep2": "+model=deepseek"}  # the others: COMMON's qwen3
# The divergence guard at work: with these settings the uninterrupted run skips steps 10, 12-14, 17-19 and 21-23
# as loss spikes (above 1.01 x the mean of the last 2 good losses), and saves no checkpoint at step 12 (mid-streak).
GUARDED = {"dp2_distopt_spikes": [*LAYOUTS["dp2_distopt"], "train.lr=1e-2", "train.loss_spike_factor=1.01",
                                  "train.loss_spike_window=2", "train.max_skipped_steps=50"]}
KILL_AFTER_STEP = 6  # a checkpoint (step 4) exists and later steps ran


def base(layout: str) -> list:
    """COMMON with the layout's model."""
    return [MODELS.get(layout, COMMON[0]), *COMMON[1:]]


def per_step(output_dir: Path) -> dict:
    rows = read_metrics(output_dir)
    # A resumed run logs the steps after its checkpoint again; their earlier rows are moved to
    # metrics.redone.jsonl, so each step has one row.
    assert len({row["iteration"] for row in rows}) == len(rows), "a step has two rows in metrics.jsonl"
    return {row["iteration"]: row for row in rows}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Per layout, the rows of a run that was never stopped (computed on first use)."""
    cache = {}

    def rows(layout: str) -> dict:
        if layout not in cache:
            out = tmp_path_factory.mktemp(f"whole_{layout}")
            procs.run(2, [*base(layout), *{**LAYOUTS, **GUARDED}[layout], f"train.output_dir={out}"])
            cache[layout] = per_step(out)
            assert sorted(cache[layout]) == list(range(1, TOTAL + 1))
        return cache[layout]

    return rows


def assert_same_steps(resumed: dict, expected: dict) -> None:
    assert sorted(resumed) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        for key in ("loss", "lr", "grad_norm", "consumed_samples", "skipped", "skipped_steps"):
            assert resumed[step][key] == expected[step][key], f"step {step}: {key} differs after the resume"


def resumed_at(stdout: str) -> int:
    match = re.search(r"resumed from \S+iter_\d+ at step (\d+)", stdout)
    assert match, f"the second run did not resume:\n{stdout[-3000:]}"
    return int(match.group(1))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_killed_mid_run_resumes_exactly(tmp_path, uninterrupted, layout):
    out = tmp_path / "run"
    command = [*base(layout), *LAYOUTS[layout], f"train.output_dir={out}"]
    proc = procs.start(2, command, log=tmp_path / "killed.log")
    try:
        procs.wait_until(proc, lambda: procs.last_step(procs.metrics_file(out)) >= KILL_AFTER_STEP)
    finally:
        procs.kill_tree(proc.pid)
    killed_at = procs.last_step(procs.metrics_file(out))
    assert killed_at < TOTAL

    again = procs.run(2, command)
    start = resumed_at(again.stdout)
    # Resumed in the middle, from a checkpoint before the kill, with 10+ steps left to compare.
    assert 0 < start <= killed_at and TOTAL - start >= 10, (start, killed_at)
    assert_same_steps(per_step(out), uninterrupted(layout))


def test_the_divergence_guard_resumes_with_its_window_and_count(tmp_path, uninterrupted):
    """train.loss_spike_factor: the guard's window of recent losses and its count of skipped steps come back with
    the checkpoint, so the steps it skips after the resume point are those of the uninterrupted run (with an
    empty window the first steps after a resume could not be judged, and the count would start again at 0)."""
    expected = uninterrupted("dp2_distopt_spikes")
    out = tmp_path / "run"
    command = [*COMMON, *GUARDED["dp2_distopt_spikes"], f"train.output_dir={out}"]
    proc = procs.start(2, command, log=tmp_path / "killed.log")
    try:
        procs.wait_until(proc, lambda: procs.last_step(procs.metrics_file(out)) >= 17)
    finally:
        procs.kill_tree(proc.pid)
    again = procs.run(2, command)
    start = resumed_at(again.stdout)
    assert start in (16, 20), start  # never 12: no checkpoint is saved while the guard skips steps
    assert expected[start]["skipped_steps"] > 0 and expected[start + 1]["skipped"]  # what must come back
    assert_same_steps(per_step(out), expected)


def test_sigterm_saves_then_the_same_command_continues_exactly(tmp_path, uninterrupted):
    """What SLURM does at preemption: SIGTERM. The step in flight finishes, a checkpoint is written, the
    workers exit 0; the same command (default run folder) continues that run exactly."""
    command = [*COMMON, *LAYOUTS["dp2_distopt"]]  # no train.output_dir: the default run folder
    proc = procs.start(2, command, cwd=tmp_path, log=tmp_path / "first.log")
    runs = tmp_path / "outputs"

    def run_folder():
        found = list(runs.glob("*/*/metrics.jsonl"))
        return found[0].parent if found else None

    try:
        procs.wait_until(proc, lambda: run_folder() is not None and
                         procs.last_step(procs.metrics_file(run_folder())) >= 5)
        proc.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to its workers
        proc.wait(timeout=60)
    finally:
        procs.kill_tree(proc.pid)
    log = (tmp_path / "first.log").read_text()
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 24; checkpoint (\S+)\.", log)
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert step < TOTAL and not re.search(r"exitcode\s*:\s*[1-9]", log), log[-3000:]  # workers exited 0
    assert Path(tmp_path / stopped.group(2)).name == f"iter_{step:07d}"

    again = procs.run(2, command, cwd=tmp_path)
    assert "continuing this command's unfinished run" in again.stdout
    assert resumed_at(again.stdout) == step
    assert_same_steps(per_step(run_folder()), uninterrupted("dp2_distopt"))
    assert len(list(runs.glob("*/*"))) == 1  # one run, one folder


def test_another_command_starts_its_own_run_and_leaves_the_unfinished_one_alone(tmp_path, uninterrupted):
    """Run A is stopped (SIGTERM) in the default folder; the same command but for train.lr is another command:
    it starts a new folder instead of continuing A, and A's own command then continues A exactly."""
    command = [*COMMON, *LAYOUTS["dp2_distopt"]]
    runs = tmp_path / "outputs"
    proc = procs.start(2, command, cwd=tmp_path, log=tmp_path / "a.log")
    try:
        procs.wait_until(proc, lambda: any(procs.last_step(m) >= 5 for m in runs.glob("*/*/metrics.jsonl")))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        procs.kill_tree(proc.pid)
    stopped = re.search(r"stopped by SIGTERM at step (\d+) of 24", (tmp_path / "a.log").read_text())
    assert stopped, (tmp_path / "a.log").read_text()[-3000:]
    (run_a,) = runs.glob("*/*")
    other = procs.run(2, [*command, "train.lr=2e-3"], cwd=tmp_path)
    assert "(new run)" in other.stdout and "continuing" not in other.stdout
    assert len(list(runs.glob("*/*"))) == 2 and procs.last_step(procs.metrics_file(run_a)) == int(stopped.group(1))
    again = procs.run(2, command, cwd=tmp_path)
    assert f"run folder {run_a.relative_to(tmp_path)} (continuing this command's unfinished run)" in again.stdout
    assert resumed_at(again.stdout) == int(stopped.group(1))
    assert_same_steps(per_step(run_a), uninterrupted("dp2_distopt"))


def test_adam_state_is_per_parameter_after_resume(tmp_path):
    """The distributed optimizer's Adam step count comes back per parameter, at the checkpoint's value
    (megatron-core 0.16 restores one shared tensor at 0; checkpoint._restore_adam_steps)."""
    out = tmp_path / "run"
    base = ["+model=qwen3", "train.precision=fp32", "train.seq_length=32", "train.global_batch_size=4",
            "train.micro_batch_size=2", "parallel.distributed_optimizer=true", "logging.tensorboard=false",
            f"train.output_dir={out}"]
    procs.run(2, [*base, "train.train_iters=3"])
    result = tmp_path / "steps.json"
    procs.run(2, [str(result), *base, "train.train_iters=3"], script=Path(__file__).with_name("adam_state_worker.py"))
    steps = json.loads(result.read_text())
    assert steps["values"] == [3.0] and steps["distinct"] == steps["count"] > 1, steps


GKD_TOTAL = 12


def test_gkd_on_policy_draws_continue_after_a_kill(tmp_path, tiny_hf):
    """task=gkd with lmbda 0.5: which samples the student completes itself, and what it samples, key on the
    training step, which comes back with the checkpoint: after a SIGKILL and the same command, every step's
    loss, gradient norm and on-policy fraction equal the uninterrupted run's (a count restarting at the resume
    would draw other samples)."""
    from tests.multiproc.test_hf_load import _save_tiny

    teacher = tmp_path / "teacher"  # another random tiny Qwen3 with tiny_hf's vocabulary
    _save_tiny("qwen3", teacher, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    command = ["+model=qwen3", f"model.pretrained={tiny_hf}", "data=sft", "data.tokenizer=byte", "task=gkd",
               f"task.teacher.model={teacher}", "task.teacher.tokenizer=byte", "task.lmbda=0.5",
               "task.max_new_tokens=8", "train.seq_length=128", "data.truncation=drop", "train.precision=fp32",
               f"train.train_iters={GKD_TOTAL}", "train.global_batch_size=4", "train.micro_batch_size=2",
               "train.save_interval=2", "train.keep_last=2", "train.lr=1e-3", "logging.tensorboard=false"]
    whole, out = tmp_path / "whole", tmp_path / "run"
    procs.run(1, [*command, f"train.output_dir={whole}"])
    expected = per_step(whole)
    proc = procs.start(1, [*command, f"train.output_dir={out}"], log=tmp_path / "killed.log")
    try:
        procs.wait_until(proc, lambda: procs.last_step(procs.metrics_file(out)) >= 5)
    finally:
        procs.kill_tree(proc.pid)
    killed_at = procs.last_step(procs.metrics_file(out))
    assert killed_at < GKD_TOTAL
    start = resumed_at(procs.run(1, [*command, f"train.output_dir={out}"]).stdout)
    assert 0 < start <= killed_at, (start, killed_at)
    resumed = per_step(out)
    assert sorted(resumed) == sorted(expected) == list(range(1, GKD_TOTAL + 1))
    for step in range(1, GKD_TOTAL + 1):
        for key in ("loss", "grad_norm", "on_policy"):
            assert resumed[step][key] == expected[step][key], f"step {step}: {key} differs after the resume"
    # the draws mattered: after the resume point some steps mixed the student's samples with the data's
    assert any(0 < expected[s]["on_policy"] < 1 for s in range(start + 1, GKD_TOTAL + 1)), expected
