"""Per-rank memory of DPO with a frozen reference model vs with precomputed reference log-probs.

    python tools/bench/dpo_memory.py [--nproc 2] [--hidden 512] [--layers 8] [--steps 3] [extra overrides]

Builds a random Qwen3-shaped HF checkpoint of the given size, then runs the
same DPO job twice under torchrun on the bundled preference set: once holding
the reference model for the whole run, once with task.precompute_ref=true (the
reference runs over the data once and is freed). Prints the memory the trainer
logs for the last rank (CUDA allocator peak on GPU, resident set at the last
step on CPU), the reference's parameter bytes per rank, and the ratio.
Extra arguments go to both runs (e.g. parallel.tp=2 train.device=cuda).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_runs import make_model, size_args  # noqa: E402


def run(work: str, name: str, nproc: int, overrides: list) -> dict:
    out = os.path.join(work, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29577",
           os.path.join(ROOT, "launch", "train.py"), *overrides, f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    return rows[-1]


def main() -> None:
    args, extra = size_args(__doc__)
    with tempfile.TemporaryDirectory() as work:
        hf = os.path.join(work, "hf")
        params = make_model(hf, args.hidden, args.layers)
        base = ["+model=qwen3", f"model.pretrained={hf}", "data=prefs", "data.tokenizer=byte", "task=dpo",
                "train.seq_length=96", f"train.train_iters={args.steps}", "logging.tensorboard=false", *extra]
        live = run(work, "live", args.nproc, base)
        pre = run(work, "pre", args.nproc, [*base, "task.precompute_ref=true"])
    tp_pp = 1
    for item in extra:
        if item.startswith(("parallel.tp=", "parallel.pp=")):
            tp_pp *= int(item.split("=")[1])
    ref_gib = params * 4 / tp_pp / 2**30  # fp32 CPU weights; bf16 on GPU halves it
    print(f"model {params / 1e6:.1f}M params, {args.nproc} ranks, {args.steps} DPO steps; memory of the last rank "
          "(GPU: allocator peak; CPU: resident set at the last step):")
    print(f"  frozen reference model      {live['memory_gib']:.3f} GiB")
    print(f"  precomputed reference       {pre['memory_gib']:.3f} GiB")
    print(f"  ratio precomputed / frozen  {pre['memory_gib'] / live['memory_gib']:.3f}  "
          f"(reference weights per rank: about {ref_gib:.3f} GiB in fp32)")


if __name__ == "__main__":
    main()
