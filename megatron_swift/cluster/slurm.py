"""A SLURM job for a training run: an sbatch script and the command each node runs.

The job has one srun task per node; each runs ``node.sh``, which starts
torchrun with ``gpus_per_node`` ranks and a c10d rendezvous on the first node
of the allocation (``MASTER_ADDR``, from ``scontrol show hostnames``), so
ranks are numbered by torchrun and no node needs to know its own rank. Every
rank gets the same absolute ``train.output_dir``, written into the script: one
run directory for all ranks and for every restart of the job. With
``cluster.requeue`` SLURM signals the batch shell (USR1) ``cluster.signal_seconds``
before preemption or the time limit; the shell passes USR1 on to the training
(srun forwards it to every node's torchrun, which forwards it to its workers),
the workers finish their step, save a checkpoint and exit (training.stop), then
the shell requeues the job, and the new job, given the same output directory
with ``train.resume=auto``, continues from that checkpoint. Logs: the batch shell's in
``<output_dir>/slurm/logs/<job>-<id>.out``, each node's in ``...-node<N>.out``.
"""
from __future__ import annotations

import os
import shlex
from typing import List, Sequence, Tuple


def _container(cluster, workdir: str) -> List[str]:
    if not cluster.image:
        return []
    options = [f"--container-image={cluster.image}", f"--container-workdir={workdir}"]
    if cluster.container_mounts:
        options.append("--container-mounts=" + ",".join(cluster.container_mounts))
    return options


def node_script(cluster, workdir: str, overrides: Sequence[str]) -> str:
    """The command of one node: torchrun with this node's share of the ranks."""
    args = " ".join(shlex.quote(o) for o in overrides)
    return f"""#!/bin/bash
# One node of the job (srun starts it once per node). Ranks are assigned by the c10d rendezvous
# on the first node; SLURM_NNODES, SLURM_JOB_ID, MASTER_ADDR and MASTER_PORT come from the job.
set -euo pipefail
cd {shlex.quote(workdir)}
# torchrun forwards USR1 (the end-of-allocation warning) to its workers, which save and stop, and gives
# them up to the warning's lead time to do so before it kills them (torchrun's PET_* settings).
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export PET_SHUTDOWN_TIMEOUT={max(30, cluster.signal_seconds - 10)}
exec python -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node={cluster.gpus_per_node} \\
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \\
    launch/train.py {args}
"""


def sbatch_script(cluster, name: str, log_dir: str, node_sh: str, workdir: str) -> str:
    """The batch script: allocation, rendezvous address, requeue on signal, one srun task per node."""
    options = [f"--job-name={name}", f"--nodes={cluster.nodes}", "--ntasks-per-node=1",
               f"--gpus-per-node={cluster.gpus_per_node}", f"--time={cluster.time}",
               f"--output={log_dir}/%x-%j.out", "--open-mode=append"]
    options += [f"--partition={cluster.partition}"] if cluster.partition else []
    options += [f"--account={cluster.account}"] if cluster.account else []
    options += ["--requeue", f"--signal=B:USR1@{cluster.signal_seconds}"] if cluster.requeue else []
    options += list(cluster.sbatch_extra)
    srun = ["srun", f"--nodes={cluster.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            f"--output={log_dir}/%x-%j-node%n.out", *_container(cluster, workdir), "bash", node_sh]
    header = "\n".join(f"#SBATCH {o}" for o in options)
    return f"""#!/bin/bash
{header}
# Written by launch/slurm.py. Resubmitting this file (or a requeue) continues the same run.
set -uo pipefail
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT={cluster.master_port}
export PYTHONUNBUFFERED=1
echo "megatron-swift: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST," \\
     "rendezvous $MASTER_ADDR:$MASTER_PORT"

stop_and_requeue() {{
    echo "megatron-swift: end of allocation signalled: the training saves a checkpoint and stops"
    kill -USR1 "$srun_pid" 2>/dev/null  # srun passes it to every node's torchrun, torchrun to its workers
    wait "$srun_pid"
    echo "megatron-swift: requeueing job $SLURM_JOB_ID (it resumes from that checkpoint)"
    scontrol requeue "$SLURM_JOB_ID"
}}
{"trap stop_and_requeue USR1" if cluster.requeue else "# requeue disabled (cluster.requeue=false)"}

{" ".join(shlex.quote(a) for a in srun)} &
srun_pid=$!
wait "$srun_pid"  # a signal interrupts this wait: the trap runs (and waits for the step to save and end)
status=$?
wait
exit $status
"""


def write_job(cfg, overrides: Sequence[str], output_dir: str, workdir: str) -> Tuple[str, str]:
    """Write ``job.sbatch`` and ``node.sh`` under ``<output_dir>/slurm``; returns their paths."""
    cluster = cfg.cluster
    folder = os.path.join(output_dir, "slurm")
    log_dir = os.path.join(folder, "logs")
    os.makedirs(log_dir, exist_ok=True)
    node_sh, job = os.path.join(folder, "node.sh"), os.path.join(folder, "job.sbatch")
    # The run's own overrides, with the run directory made absolute and fixed for every node and restart.
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("train.output_dir=", "train.resume="))]
    train_overrides = [*kept, f"train.output_dir={output_dir}", "train.resume=auto"]
    name = cluster.job_name or f"megatron-swift-{cfg.model.family}-{cfg.model.size}"
    with open(node_sh, "w", encoding="utf-8") as f:
        f.write(node_script(cluster, workdir, train_overrides))
    with open(job, "w", encoding="utf-8") as f:
        f.write(sbatch_script(cluster, name, log_dir, node_sh, workdir))
    os.chmod(node_sh, 0o755)
    return job, node_sh
