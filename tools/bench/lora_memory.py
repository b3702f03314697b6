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

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _tensor_bytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_bytes(optimizer) -> int:
    """Adam state plus fp32 main parameters (bf16/fp16 runs), over every chained optimizer."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        total += sum(_tensor_bytes(state) for state in inner.state.values())
        for group in getattr(opt, "shard_fp32_from_float16_groups", None) or \
                getattr(opt, "fp32_from_float16_groups", None) or []:
            total += _tensor_bytes(group)
    return total


def worker(result_file: str, overrides: list) -> None:
    import resource

    import torch
    import torch.distributed as dist

    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup

    trainer = setup(compose(overrides))
    trainer.fit()
    trainer.sinks.close()
    grads = sum(_tensor_bytes(b.grad_data) for chunk in trainer.model for b in chunk.buffers)
    if torch.cuda.is_available() and trainer.backend.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = {"rank": dist.get_rank(), "optimizer_bytes": optimizer_bytes(trainer.optimizer), "grad_bytes": grads,
            "peak_bytes": peak,
            "trainable": sum(p.numel() for c in trainer.model for p in c.parameters() if p.requires_grad)}
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
    from dpo_memory import make_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args, extra = parser.parse_known_args()
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
