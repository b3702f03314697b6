"""The SLURM job, run on this machine: two "nodes" (two torchrun processes, --nnodes 2 on loopback, one rank
each, SLURM variables set as srun sets them) train like one node with 2 ranks; and a job warned of the end
of its allocation (USR1) saves where it is, requeues itself, and started again continues from that step
exactly (srun and scontrol are stubs that do what SLURM does: start node.sh once per node and pass signals
on to it; print the first host; record the requeue)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, free_port, read_metrics, run_train, train_env
from tests.multiproc.procs import kill_tree, last_step

TRAIN = ["+model=qwen3", "train.precision=fp32", "train.device=cpu", "train.seq_length=64", "train.train_iters=12",
         "train.global_batch_size=4", "train.micro_batch_size=1", "train.save_interval=3", "train.keep_last=2",
         "logging.tensorboard=false"]
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done   # srun's options: the stub runs the command once per node
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & pids+=($!); done
trap 'kill -USR1 "${pids[@]}"' USR1   # srun passes the signals it gets on to its tasks
while ! wait; do :; done   # a trapped signal interrupts wait: wait again until the tasks are done
"""
SCONTROL = """#!/bin/bash
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$REQUEUE_LOG" ;;
esac
"""


def _job(tmp_path, out):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "slurm.py"), *TRAIN, "cluster=slurm",
                           "cluster.nodes=2", "cluster.gpus_per_node=1", f"cluster.master_port={free_port()}",
                           "cluster.dry_run=true", f"train.output_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "slurm" / "job.sbatch", out / "slurm" / "node.sh"


def _slurm_env(tmp_path, port=None) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(train_env(), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="localhost", REQUEUE_LOG=str(tmp_path / "requeued"), PYTHON=sys.executable)
    if port:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _losses(out) -> dict:
    return {r["iteration"]: r["loss"] for r in read_metrics(out)}  # a resumed run re-logs steps: last wins


def test_two_local_nodes_train_like_one_node_with_two_ranks(tmp_path):
    _, node = _job(tmp_path, tmp_path / "nodes")
    env = _slurm_env(tmp_path, free_port())
    procs = [subprocess.Popen(["bash", str(node)], cwd=ROOT, env=dict(env, SLURM_NODEID=str(i), SLURM_PROCID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    run_train(2, [*TRAIN, f"train.output_dir={tmp_path / 'one'}"])
    assert _losses(tmp_path / "nodes") == _losses(tmp_path / "one") and len(_losses(tmp_path / "one")) == 12


def test_a_warned_job_saves_requeues_and_continues_exactly(tmp_path):
    out = tmp_path / "run"
    job, _ = _job(tmp_path, out)
    env = _slurm_env(tmp_path)
    first_log = tmp_path / "first_job.out"  # sbatch would write it to slurm/logs; the stubs leave it to us
    proc = subprocess.Popen(["bash", str(job)], cwd=ROOT, env=env, stdout=open(first_log, "w"),
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while last_step(out / "metrics.jsonl") < 4:  # past the first checkpoint (step 3)
            assert proc.poll() is None and time.time() < deadline, "the job ended or stalled before step 4"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)  # SLURM's warning before preemption / the time limit
        proc.wait(timeout=120)  # the trap waits for the training to save and stop, then requeues
    finally:
        kill_tree(proc.pid)  # every process of the job, torchrun's workers included
    assert (tmp_path / "requeued").read_text().strip() == "4242"
    log = first_log.read_text()
    stopped_at = max(_losses(out))
    assert f"stopped by SIGUSR1 at step {stopped_at} of 12" in log, log[-3000:]
    assert (out / "checkpoints" / f"iter_{stopped_at:07d}").is_dir() and stopped_at < 12
    again = subprocess.run(["bash", str(job)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"at step {stopped_at} (epoch" in again.stdout  # resumed from the checkpoint the warning made
    run_train(2, [*TRAIN, f"train.output_dir={tmp_path / 'whole'}"])
    assert _losses(out) == _losses(tmp_path / "whole")
    assert sorted(_losses(out)) == list(range(1, 13))
