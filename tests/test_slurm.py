"""launch/slurm.py writes a job that bash accepts, with one srun task per node and a c10d rendezvous."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def write_job(tmp_path, *extra):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "slurm.py"), "+model=qwen3", "model.size=8b",
                           "cluster=slurm", "cluster.nodes=2", "cluster.gpus_per_node=8", "cluster.partition=p",
                           "cluster.time=12:00:00", "cluster.image=nvcr.io/nvidia/pytorch:25.01-py3",
                           "cluster.dry_run=true", "parallel.tp=4", "parallel.pp=2", f"train.output_dir={out}",
                           "train.max_epochs=1", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "slurm" / "job.sbatch", out / "slurm" / "node.sh", proc.stdout


def test_two_node_job_passes_bash_n_and_launches_one_torchrun_per_node(tmp_path):
    job, node, stdout = write_job(tmp_path, r"train.freeze_regex=^decoder\.layers\.(0|1)\.")
    assert "not submitted" in stdout
    for script in (job, node):
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    text = job.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=p", "#SBATCH --time=12:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", "trap stop_and_requeue USR1", 'kill -USR1 "$srun_pid"',
                 'scontrol requeue "$SLURM_JOB_ID"',
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1'):
        assert line in text, line
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--nodes=2 --ntasks-per-node=1" in srun and "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in srun
    assert f"--output={tmp_path / 'run' / 'slurm' / 'logs'}/%x-%j-node%n.out" in srun  # a log per node
    assert srun.endswith(f"bash {node} &")
    launch = node.read_text()
    assert '--nnodes="$SLURM_NNODES" --nproc_per_node=8' in launch
    assert '--rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"' in launch
    # One absolute run directory for every rank and every restart; the regex survives quoting.
    assert f"train.output_dir={tmp_path / 'run'} train.resume=auto" in launch
    assert "'train.freeze_regex='\"'\"'^decoder\\.layers\\.(0|1)\\.'\"'\"''" in launch


def test_invalid_layout_is_refused_before_writing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "slurm.py"), "+model=qwen3", "cluster=slurm",
                           "cluster.nodes=1", "cluster.gpus_per_node=3", "parallel.tp=2", "cluster.dry_run=true",
                           f"train.output_dir={tmp_path / 'run'}", "train.max_epochs=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "world size 3 is not divisible by parallel.tp*pp*cp=2*1*1" in proc.stderr
    assert not (tmp_path / "run").exists()
