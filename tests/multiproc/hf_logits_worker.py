"""Run under torchrun: build the model through the trainer's own setup (model.pretrained or model.load),
push fixed tokens through megatron-core's forward-only schedule, save full-vocabulary logits.

usage: hf_logits_worker.py <tokens.pt> <out.pt> <override> [<override> ...] [--also=<hf folder>,<out.pt> ...]

--also: after the trainer's own model, more HF folders (of any family) under the same layout, each built and
loaded as model.pretrained=<folder> would be, in the same processes (one launch for several models: CI time).
"""
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "convert"))


def main() -> None:
    import torch
    import torch.distributed as dist
    from check import megatron_logits
    from megatron.core import parallel_state as ps

    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup

    tokens_file, out_file, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    overrides = [a for a in args if not a.startswith("--also=")]
    also = [a[len("--also="):].split(",") for a in args if a.startswith("--also=")]
    cfg = compose(overrides)
    trainer = setup(cfg)
    tokens = torch.load(tokens_file, weights_only=True)
    models = [(out_file, lambda: trainer.model)] + [(out, lambda folder=folder: _load(trainer, cfg, folder))
                                                    for folder, out in also]
    for out, model in models:
        logits = megatron_logits(SimpleNamespace(model=model(), backend=trainer.backend), tokens)
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save(logits, out)
    dist.barrier()


def _load(trainer, cfg, folder: str) -> list:
    """The model chunks of HF ``folder`` under the trainer's layout, built and loaded as setup() does."""
    import dataclasses

    from omegaconf import OmegaConf

    from megatron_swift.convert.hf_config import read_hf_config
    from megatron_swift.models.families import hf_family_name
    from megatron_swift.convert.hf_load import load_hf_weights
    from megatron_swift.models.arch import padded_vocab_size, resolve
    from megatron_swift.models.builder import build_model, transformer_config

    OmegaConf.update(cfg, "model.pretrained", folder)
    OmegaConf.update(cfg, "model.family", hf_family_name(read_hf_config(folder), folder))  # its own family
    arch = dataclasses.replace(resolve(cfg.model), head=trainer.arch.head)
    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp)
    chunks = build_model(arch, transformer_config(arch, cfg, trainer.backend, initialize=False), padded,
                         cfg.train.seq_length, trainer.backend)
    load_hf_weights(chunks, folder, arch, padded)
    return chunks


if __name__ == "__main__":
    main()
