"""apply_tuner: called once per run (and by the exporters) after the base weights are loaded and before
megatron-core's DDP wraps the model, so only trainable parameters get gradient buffers and optimizer state."""
from __future__ import annotations

from typing import List

from megatron_swift.tuners import part_lr
from megatron_swift.tuners.freeze import set_trainable, summary
from megatron_swift.tuners.lora import attach
from megatron_swift.tuners.names import global_parameters, offsets, to_global


def apply_tuner(chunks, cfg, check_patterns: bool = True) -> str:
    """Attach LoRA adapters (tuner=lora) and set which parameters train; returns a one-line summary.

    ``check_patterns=False`` (exporters, which build a one-layer model) only attaches the adapters."""
    if cfg.tuner.name == "lora":
        attach(chunks, cfg.tuner, cfg.train.seed,
               lambda i, local: to_global(local, offsets(chunks[i], i, len(chunks))))
    named: List = list(global_parameters(chunks))
    if check_patterns:
        vlm = any(hasattr(chunk, "vision_model") for chunk in chunks)  # models.vlm, with its encoder or not (PP)
        groups = next((c.freeze_groups for c in chunks if getattr(c, "freeze_groups", None)), {})
        set_trainable(named, cfg.tuner, cfg.train, vlm, groups)
        part_lr.mark(named, cfg.train, groups)  # train.vision_lr / projector_lr: their optimizer groups
    return summary(named)
