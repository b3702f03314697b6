"""HF folder -> Megatron distributed checkpoint holding model weights only (no optimizer state).

Each rank builds its shard of the model under the configured layout, streams
its slices of the HF tensors into it (hf_load) and megatron-core writes the
checkpoint in global coordinates, so it loads under any layout later.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from megatron_swift.config.validate import ConfigError
from megatron_swift.convert.hf_load import load_hf_weights
from megatron_swift.models.arch import padded_vocab_size
from megatron_swift.models.builder import build_model, transformer_config
from megatron_swift.training import checkpoint as ckpt
from megatron_swift.training.loop import init_runtime, model_meta


def hf_to_checkpoint(cfg) -> str:
    """Convert ``cfg.model.pretrained`` into ``<train.output_dir>/checkpoints/iter_0000000``; returns that path."""
    output_dir = cfg.train.output_dir  # the tool's --out
    if ckpt.complete_checkpoints(ckpt.checkpoints_dir(output_dir)):
        raise ConfigError([f"{output_dir} already holds checkpoints; choose a new --out"])
    arch, be = init_runtime(cfg)
    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp)
    chunks = build_model(arch, transformer_config(arch, cfg, be, initialize=False), padded, cfg.train.seq_length, be)
    load_hf_weights(chunks, cfg.model.pretrained, arch, padded)
    return ckpt.save_weights(output_dir, chunks, OmegaConf.to_yaml(cfg), model_meta(arch, arch.vocab_size, padded))
