"""Packed SFT rows against unpacked rows of the same shape: what keeping samples apart costs.

The project's step on full rows of random tokens (causal attention over the whole row) and on SFT
conversations of 100 to 1,500 tokens packed into rows of the same length (each sample attends within
itself: on CUDA the varlen flash kernel, models.varlen). Prints tokens/s of both and their ratio.

    python tools/bench/packed.py --shape 1.7b            # one GPU, seq 4096 (target: packed >= 0.90 x)
    python tools/bench/packed.py --shape tiny --steps 2  # CPU smoke run
    python tools/bench/packed.py -- model.attention_backend=local   # overrides for both runs
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tools.bench.vs_hf import run_paths, shape_parser  # noqa: E402


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs")
    args = parser.parse_args()
    rates = {}
    for data in ("mock", "packed"):
        r = run_paths(args.shape, ["project"], data, args.steps, args.warmup, args.overrides)["project"]
        rates[data] = r["tokens"] / r["seconds"]
        print(f"{data:7s} {rates[data]:>12,.0f} tokens/s  peak memory {r['memory_gib']:.2f} GiB  "
              f"({r['device']}, attention={r['attention']})", flush=True)
    print(f"packed/unpacked tokens/s {rates['packed'] / rates['mock']:.3f} (target >= 0.90)")


if __name__ == "__main__":
    main()
