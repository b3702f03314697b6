"""Megatron checkpoint (any layout) -> Hugging Face folder that transformers.from_pretrained loads.

    python tools/convert/mcore_to_hf.py --ckpt outputs/qwen3-tiny --out /tmp/qwen3-hf [--dtype bf16]

Runs on one CPU process and streams: the checkpoint is read one decoder layer
at a time (megatron-core reads it in global coordinates, whatever layout it
was trained with) and safetensors shards are written as they fill, so memory
stays near one shard plus one layer. Tensors keep the dtype they were saved in
unless --dtype says otherwise. The config.json of the run's model.pretrained
folder is reused when that folder still exists; otherwise one is written from
the architecture stored in the checkpoint. Tokenizer and generation files are
copied from that folder.

A LoRA run's checkpoint holds its adapters only: it is merged into the base
(the run's model.pretrained, or --base) and written as a plain HF model, or
with --export adapter written as a PEFT adapter folder for that base.

Trust: reading a checkpoint runs no code from it. Its pickled metadata may
only name the classes checkpoints are made of, and anything else is refused
(exit code 2, naming the file). A checkpoint from an untrusted source is still
that source's data, though: exchange models as the HF safetensors folder this
tool writes, not as Megatron checkpoints.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def convert(ckpt_path: str, out_dir: str, dtype: str | None = None, max_shard_gb: float = 5.0,
            export: str | None = None, base: str | None = None) -> str:
    from omegaconf import OmegaConf

    from megatron_swift.convert.hf_export import export_checkpoint
    from megatron_swift.training import checkpoint as ckpt

    path = ckpt.find_checkpoint(ckpt_path)
    source = base or OmegaConf.load(os.path.join(path, "config.yaml")).model.get("pretrained")
    export_checkpoint(path, out_dir, source if source and os.path.isdir(source) else None, dtype,
                      max_shard_bytes=int(max_shard_gb * 2**30), export=export)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run dir, its checkpoints dir, or an iter_N dir")
    parser.add_argument("--out", required=True, help="new HF folder to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="tensor dtype (default: as saved)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (GiB)")
    parser.add_argument("--export", choices=("merged", "adapter"),
                        help="LoRA runs: merged HF model or PEFT adapter (default: the run's tuner.export)")
    parser.add_argument("--base", help="LoRA runs: the base HF folder (default: the run's model.pretrained)")
    args = parser.parse_args()
    try:
        used = convert(args.ckpt, args.out, args.dtype, args.max_shard_gb, args.export, args.base)
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"megatron-swift: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out} from {used}")


if __name__ == "__main__":  # dist_checkpointing starts worker processes
    main()
