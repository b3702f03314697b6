"""DeepStack (Qwen3-VL): features of several vision-tower layers added into the first language-model layers'
outputs at the image positions.

transformers' Qwen3-VL text model adds ``deepstack_visual_embeds[j]`` to the hidden states at the image positions
right after decoder layer ``j`` (j < the number of DeepStack features). megatron-core 0.16's GPTModel /
TransformerBlock has no input for per-layer additions, so this is done here, in one place, by forward hooks on
those decoder layers (``TransformerLayer`` returns ``(hidden_states, context)``; the hook returns the same pair
with the features added). The features of the micro-batch and its ``image_index`` are handed over by the VLM's
forward (models/vlm.py, ``VisionLanguageModel.deepstack``) just before the language model runs, so the hooks see
the micro-batch being computed.

Layouts: the hidden states are this rank's [s, b, h] (context-parallel chunks: ``image_index`` is the CP rank's
own, its rows global feature numbers, as for the input embeddings; sequence parallelism: this TP rank's slice
of s). Pipeline parallelism works when the first stage's first chunk holds every DeepStack layer (the tower
lives there; families/qwen3_vl.layout_problems refuses other layouts). Full activation recompute would rerun
the hooks in backward with a later micro-batch's features: refused at build.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import parallel_state as ps


class DeepStack:
    """Hooks on the decoder layers ``layers`` (global layer number 1..k: layer j gets feature set j-1)."""

    def __init__(self, layers: List[torch.nn.Module], count: int, sequence_parallel: bool):
        self.count, self.sequence_parallel = count, sequence_parallel
        self._features: Optional[List[torch.Tensor]] = None
        self._index: Optional[torch.Tensor] = None
        self._held = sorted(layer.layer_number - 1 for layer in layers if layer.layer_number <= count)
        for layer in layers:
            if layer.layer_number <= count:
                layer.register_forward_hook(self._hook(layer.layer_number - 1))

    def take(self, features, image_index: Optional[torch.Tensor]):
        """The tower's output -> its main features. ``features``: (main [N, h], [k x [N, h]]) from a DeepStack
        tower, or None (a micro-batch without images: nothing is added)."""
        if features is None:
            self._features = self._index = None
            return None
        main, per_layer = features
        # Checked here, not at build: a model built with fewer layers (the converter's one-layer reader) never
        # runs; a layout that families/qwen3_vl.layout_problems let through (uneven stages) would be wrong.
        if self._held != list(range(self.count)):
            raise ValueError(f"DeepStack adds vision features after the first {self.count} decoder layers, but the "
                             f"first pipeline chunk holds layers {self._held}: use fewer pipeline stages")
        self._features, self._index = list(per_layer), self._local(image_index)
        return main

    def _local(self, image_index: torch.Tensor) -> torch.Tensor:
        """[s, b] feature rows (-1: text) of the positions this rank's hidden states hold."""
        index = image_index.t()
        if self.sequence_parallel:
            size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            step = index.shape[0] // size
            index = index[rank * step:(rank + 1) * step]
        return index

    def _hook(self, j: int):
        def add(module, args, output):
            if self._features is None:
                return output
            hidden, context = output
            mask = self._index >= 0
            rows = self._features[j][self._index[mask]].to(hidden.dtype)
            # hidden + 0 elsewhere: bitwise transformers' in-place "hidden[mask] += features"
            added = torch.zeros_like(hidden).masked_scatter(mask.unsqueeze(-1), rows)
            return hidden + added, context

        return add
