"""Megatron checkpoint (any layout) -> Hugging Face folder that transformers.from_pretrained loads.

    python tools/convert/mcore_to_hf.py --ckpt outputs/qwen3-tiny --out /tmp/qwen3-hf [--dtype bf16]

Runs on one CPU process: megatron-core reshards the checkpoint to TP=PP=1 on
load. The config.json of the run's model.pretrained folder is reused when that
folder still exists; otherwise one is written from the architecture stored in
the checkpoint. Tokenizer and generation files are copied from that folder.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def convert(ckpt_path: str, out_dir: str, dtype: str | None = None) -> str:
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from megatron_swift import backend as backend_mod
    from megatron_swift.convert.hf_export import export_hf
    from megatron_swift.models import families
    from megatron_swift.models.arch import Arch
    from megatron_swift.models.builder import build_model, transformer_config
    from megatron_swift.training import checkpoint as ckpt

    path = ckpt.find_checkpoint(ckpt_path)
    meta = ckpt.read_meta(path)["model"]
    cfg = OmegaConf.load(os.path.join(path, "config.yaml"))
    # One process, every parallel size 1: megatron-core reshards the checkpoint on load.
    cfg.parallel = OmegaConf.merge(cfg.parallel, dict(tp=1, pp=1, vpp=None, sp=False, cp=1, ep=1, etp=None,
                                                      distributed_optimizer=False))
    cfg.train.device = "cpu"
    be = backend_mod.init("cpu")
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    family = families.get(meta["family"])
    arch = Arch(family=family, **meta["arch"])
    (chunk,) = build_model(arch, transformer_config(arch, cfg, be), meta["padded_vocab_size"],
                           cfg.train.seq_length, be)
    ckpt.load_weights(path, [chunk])
    source = cfg.model.get("pretrained")
    export_hf(chunk, family, meta["arch"], meta["padded_vocab_size"], out_dir,
              source if source and os.path.isdir(source) else None, dtype)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run dir, its checkpoints dir, or an iter_N dir")
    parser.add_argument("--out", required=True, help="new HF folder to write")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="tensor dtype (default: as trained)")
    args = parser.parse_args()
    used = convert(args.ckpt, args.out, args.dtype)
    print(f"wrote {args.out} from {used}")


if __name__ == "__main__":  # dist_checkpointing starts worker processes
    main()
