"""Per-rank optimizer-state bytes and peak memory of LoRA vs full fine-tuning, same model and layout.

    python tools/bench/lora_memory.py [--nproc 2] [--hidden 512] [--layers 8] [--steps 3] [extra overrides]

Builds a random Qwen3-shaped HF checkpoint, then trains it twice under
torchrun on the bundled SFT set: every parameter (tuner=none), and LoRA
(tuner=lora, rank 16, all linears). Each rank reports the bytes held by the
optimizer (Adam moments and fp32 main copies, as the optimizer holds them),
the bytes of the gradient buffers megatron-core's DDP allocated, and its peak
memory (CUDA allocator peak on GPU, peak resident set on CPU). Prints the
figures of each rank and the LoRA / full ratios. Extra arguments go to both
runs (e.g. parallel.tp=2 train.device=cuda).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def worker(result_file: str, overrides: list) -> None:
    import resource

    import torch
    import torch.distributed as dist

    from megatron_swift.config.compose import compose
    from megatron_swift.plan.measure import allocated
    from megatron_swift.training.loop import setup

    trainer = setup(compose(overrides))
    trainer.fit()
    trainer.sinks.close()
    held = allocated(trainer.model, trainer.optimizer)
    if torch.cuda.is_available() and trainer.backend.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = {"rank": dist.get_rank(), "optimizer_bytes": held["optimizer"], "grad_bytes": held["grads"],
            "peak_bytes": peak, "trainable": held["trainable"]}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    if dist.get_rank() == 0:
        with open(result_file, "w", encoding="utf-8") as f:
            json.dump(rows, f)


def launch(work: str, name: str, nproc: int, overrides: list) -> list:
    out = os.path.join(work, name + ".json")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29578",
           os.path.abspath(__file__), "--worker", out, *overrides, f"train.output_dir={os.path.join(work, name)}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3:])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from model_runs import make_model, size_args

    args, extra = size_args(__doc__)
    with tempfile.TemporaryDirectory() as work:
        hf = os.path.join(work, "hf")
        params = make_model(hf, args.hidden, args.layers)
        base = ["+model=qwen3", f"model.pretrained={hf}", "data=sft", "data.tokenizer=byte", "data.truncation=truncate",
                "train.seq_length=128", f"train.train_iters={args.steps}", "logging.tensorboard=false", *extra]
        full = launch(work, "full", args.nproc, base)
        lora = launch(work, "lora", args.nproc, [*base, "tuner=lora", "tuner.rank=16", "tuner.alpha=32"])
    print(f"model {params / 1e6:.1f}M params, {args.nproc} ranks, {args.steps} steps, layout {extra or 'default'}")
    print("rank  run   trainable   optimizer MiB   grad buffers MiB   peak MiB")
    for f, lo in zip(full, lora):
        for name, row in (("full", f), ("lora", lo)):
            print(f"{row['rank']:>4}  {name:<4} {row['trainable'] / 1e6:>9.3f}M {row['optimizer_bytes'] / 2**20:>14.2f} "
                  f"{row['grad_bytes'] / 2**20:>17.2f} {row['peak_bytes'] / 2**20:>10.1f}")
        print(f"{f['rank']:>4}  ratio lora/full: optimizer {lo['optimizer_bytes'] / max(f['optimizer_bytes'], 1):.4f}, "
              f"grad buffers {lo['grad_bytes'] / max(f['grad_bytes'], 1):.4f}, "
              f"peak {lo['peak_bytes'] / f['peak_bytes']:.3f}")


if __name__ == "__main__":  # dist_checkpointing starts worker processes
    main()
