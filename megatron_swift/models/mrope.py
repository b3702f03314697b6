"""M-RoPE position streams ([3, s]: temporal, height, width) made by transformers' own ``get_rope_index``.

A Qwen-VL language model rotates each head's features in three sections (``mrope_section``), each by its own
position stream; text tokens have the same position in all three, image and video tokens their (t, h, w)
grid place. Which positions a family wants is its HF model's ``get_rope_index`` (Qwen2.5-VL's, later Qwen3-VL's),
a method that reads only ``self.config`` and other methods of the class: :class:`_ConfigOnly` lets it run on
the HF config alone, without building (or holding) the model, so the positions are transformers' by
construction (tests/test_qwen2_5_vl.py compares them with a real model's call).

Packed rows: each sample's streams are computed alone and laid side by side (they restart per sample, as 1-D
positions do); megatron-core's ``MultimodalRotaryEmbedding`` takes the [3, b, s] tensor.
"""
from __future__ import annotations

import types
from typing import Optional

import torch


class _ConfigOnly:
    """Stands in for ``self`` of an HF model class: ``config`` and the class's methods, no weights."""

    def __init__(self, cls, config):
        self._cls, self.config = cls, config

    def __getattr__(self, name):
        return types.MethodType(getattr(self._cls, name), self)


def hf_rope_index(model_cls, config, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                  image_grid_thw: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                  second_per_grid_ts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[3, b, s] positions of ``input_ids`` ([b, s]) as ``model_cls.get_rope_index`` gives them for ``config``
    (the HF model config object). ``mm_token_type_ids``: 0 text, 1 image, 2 video per position; the grids of
    the images / videos in order of appearance, row after row."""
    positions, _ = model_cls.get_rope_index(
        _ConfigOnly(model_cls, config), input_ids, mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts)
    return positions
