"""The SLURM job, run on this machine: two "nodes" (two torchrun processes, --nnodes 2 on loopback, one rank
each, SLURM variables set as srun sets them) train like one node with 2 ranks; and a job signalled,
requeued and started again continues from its latest checkpoint (srun and scontrol are stubs that do
what SLURM does: start node.sh once per node; print the first host; record the requeue)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, free_port, read_metrics, run_train, train_env

TRAIN = ["+model=qwen3", "train.precision=fp32", "train.device=cpu", "train.seq_length=64", "train.train_iters=12",
         "train.global_batch_size=4", "train.micro_batch_size=1", "train.save_interval=3", "train.keep_last=2",
         "logging.tensorboard=false"]
SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done   # srun's options: the stub runs the command once per node
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" & done
wait
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


def test_a_signalled_job_is_requeued_and_continues_from_its_latest_checkpoint(tmp_path):
    out = tmp_path / "run"
    job, _ = _job(tmp_path, out)
    env = _slurm_env(tmp_path)
    proc = subprocess.Popen(["bash", str(job)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("iter_*")) or \
                max(_losses(out) or [0]) < 4:
            assert proc.poll() is None and time.time() < deadline, "the job ended or stalled before a checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGUSR1)  # SLURM's warning before preemption / the time limit
        while not (tmp_path / "requeued").exists():
            assert time.time() < deadline, "the job did not requeue itself"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # SLURM stops the requeued job's processes
        proc.wait()
    assert (tmp_path / "requeued").read_text().strip() == "4242"
    stopped_at = max(_losses(out))
    assert stopped_at < 12
    again = subprocess.run(["bash", str(job)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    logs = "".join(p.read_text() for p in (out / "slurm" / "logs").glob("*") if p.is_file())
    assert "resumed from" in logs + again.stdout
    run_train(2, [*TRAIN, f"train.output_dir={tmp_path / 'whole'}"])
    assert _losses(out) == _losses(tmp_path / "whole")
    assert json.loads(json.dumps(sorted(_losses(out)))) == list(range(1, 13))
