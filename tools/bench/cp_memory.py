"""Activation memory per rank and step time with context parallelism: cp=1 against cp=2 (Ulysses).

For each sequence length, one training step of a small qwen3 (random tokens, one micro-batch) runs on one
rank and on a CP group of two. Activation memory is measured, not estimated: the bytes of every tensor
autograd saves for the backward during the step (unique storages, parameters excluded; the largest rank).
Prints the per-rank activation bytes, their ratio (target <= 0.6) and the step-time ratio.

    python tools/bench/cp_memory.py                         # seq 8k, 16k, 32k on CPU (a few minutes)
    python tools/bench/cp_memory.py --seqs 4096 --steps 1   # quick
    python tools/bench/cp_memory.py -- model.attention_backend=local   # overrides for every run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

MODEL = ["+model=qwen3", "model.num_layers=2", "model.hidden_size=256", "model.ffn_hidden_size=512",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=64"]


def _worker(out: str, seq: int, steps: int, overrides) -> None:
    import torch
    import torch.distributed as dist

    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup

    cfg = compose([*MODEL, "data=mock", f"train.seq_length={seq}", "train.micro_batch_size=1",
                   "train.global_batch_size=1", f"train.train_iters={steps + 2}", "train.save_at_end=false",
                   "train.max_epochs=null", "logging.tensorboard=false", "train.precision=fp32",
                   f"train.output_dir={tempfile.mkdtemp(prefix='cp_memory_')}", *overrides])
    trainer = setup(cfg)
    trainer.sinks.printer = lambda *_: None
    params = {p.untyped_storage().data_ptr() for chunk in trainer.model for p in chunk.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.step()
    activations = sum(saved.values())
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    seconds = (time.perf_counter() - start) / steps
    value = torch.tensor([float(activations), seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"activations": value[0].item(), "seconds": value[1].item()}, f)
    dist.barrier()
    trainer.sinks.close()


def _run(seq: int, cp: int, steps: int, overrides) -> dict:
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cp}", "--standalone",
           os.path.abspath(__file__), "--worker", out, "--seqs", str(seq), "--steps", str(steps), "--",
           f"parallel.cp={cp}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // cp))))
    if proc.returncode != 0 or not os.path.exists(out):
        sys.exit(f"seq {seq} cp={cp} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", default="8192,16384,32768")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args()
    if args.worker:
        return _worker(args.worker, int(args.seqs), args.steps, args.overrides)
    print("seq      cp=1 activations  cp=2 activations (per rank)  ratio   step time cp=2/cp=1")
    for seq in map(int, args.seqs.split(",")):
        one, two = (_run(seq, cp, args.steps, args.overrides) for cp in (1, 2))
        print(f"{seq:<8} {one['activations'] / 2**20:12.1f} MiB  {two['activations'] / 2**20:12.1f} MiB"
              f"                {two['activations'] / one['activations']:5.3f}   "
              f"{two['seconds'] / one['seconds']:5.2f} ({one['seconds']:.2f} s -> {two['seconds']:.2f} s)",
              flush=True)


if __name__ == "__main__":
    main()
