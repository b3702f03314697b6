"""Write (and submit) a SLURM job for a training run.

    python launch/slurm.py +model=qwen3 model.size=8b cluster=slurm cluster.nodes=4 cluster.gpus_per_node=8 \
        cluster.partition=p cluster.time=24:00:00 cluster.image=<image> parallel.tp=4 [cluster.dry_run=true] ...

Takes the same overrides as launch/train.py plus cluster.*; the configuration
is validated here, for nodes x gpus_per_node ranks, before anything is
submitted. See megatron_swift/cluster/slurm.py for what the job does.
"""
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

from megatron_swift.cli import run_or_exit  # noqa: E402
from megatron_swift.config.compose import check_composes, normalize_overrides  # noqa: E402
from megatron_swift.config.schema import register  # noqa: E402

register()
sys.argv[1:] = normalize_overrides(sys.argv[1:])  # as people type them: regexes, a single path for a list
run_or_exit(check_composes, sys.argv[1:])  # an unknown key or option: one line, exit 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def submit(cfg, overrides) -> None:
    from megatron_swift.cluster.slurm import write_job
    from megatron_swift.config.validate import ConfigError, validate
    from megatron_swift.training.run_dir import new_run_dir

    # The nodes have the GPU stack (TE in the NGC image): validate for the job's world, on CUDA.
    validate(cfg, cfg.cluster.nodes * cfg.cluster.gpus_per_node, te_available=True, device="cuda")
    # Checked before anything is written, so a failed submission leaves no job files behind.
    if not cfg.cluster.dry_run and shutil.which("sbatch") is None:
        raise ConfigError(["sbatch was not found on PATH, so the job cannot be submitted from here (nothing was "
                           "written): run this on a SLURM login node, or set cluster.dry_run=true to only write "
                           "the job script"])
    # One absolute folder for every node and every requeue of this job: a new run folder unless one is given.
    output_dir = os.path.abspath(cfg.train.output_dir or new_run_dir(cfg))
    job, _ = write_job(cfg, overrides, output_dir, cfg.cluster.workdir or ROOT)
    print(f"megatron-swift: wrote {job} ({cfg.cluster.nodes} nodes x {cfg.cluster.gpus_per_node} GPUs, "
          f"run directory {output_dir})")
    if cfg.cluster.dry_run:
        print("megatron-swift: cluster.dry_run=true, not submitted; submit with: sbatch " + job)
        return
    proc = subprocess.run(["sbatch", job], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"megatron-swift: sbatch failed: {proc.stderr.strip() or proc.stdout.strip()}")
    print(proc.stdout.strip())


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    run_or_exit(submit, cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    main()
