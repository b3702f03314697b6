"""HF folder -> Megatron distributed checkpoint (torch_dist) for a given layout.

    python tools/convert/hf_to_mcore.py --hf /ckpt/Qwen3-0.6B --out /ckpt/qwen3-0.6b-mcore
    torchrun --nproc_per_node 4 tools/convert/hf_to_mcore.py --hf /ckpt/Qwen3-8B --out DIR --tp 2 --pp 2

Each rank reads only the slices of the HF tensors its shard holds, and
megatron-core writes the weights (no optimizer state) as iteration 0 in global
coordinates: they load under any layout, so the layout here only decides how
the work and memory are split. Train from it with ``model.load=DIR``. Extra
arguments are config overrides.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def convert(args, overrides) -> None:
    from megatron_swift.config.compose import compose
    from megatron_swift.convert.hf_config import read_hf_config
    from megatron_swift.models.families import hf_family_name
    from megatron_swift.convert.to_mcore import hf_to_checkpoint

    hf_config = read_hf_config(args.hf)
    family = hf_family_name(hf_config, args.hf)
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
    precision = {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")
    cfg = compose([f"+model={family}", f"model.pretrained={args.hf}", f"parallel.tp={args.tp}",
                   f"parallel.pp={args.pp}", f"parallel.ep={args.ep}", f"train.precision={precision}",
                   f"train.output_dir={args.out}", *overrides])
    path = hf_to_checkpoint(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {path} (model weights, {precision}); train from it with model.load={args.out}", flush=True)


def main() -> None:
    from megatron_swift.cli import run_or_exit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF checkpoint folder")
    parser.add_argument("--out", required=True, help="new run directory for the checkpoint")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    args, overrides = parser.parse_known_args()
    run_or_exit(convert, args, overrides)


if __name__ == "__main__":  # dist_checkpointing starts worker processes
    main()
