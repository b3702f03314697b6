"""A vision tower held as the transformers module itself, whole on every tensor-parallel rank.

For VLM families whose tower megatron-core does not have (Qwen2.5-VL's windowed 2-D-rotary ViT with its patch
merger, InternViT with pixel shuffle): the module is transformers' own class, built from the HF vision
(sub)config, so its forward is transformers' by construction and its parameter names are the HF ones (the
weight table maps them by a prefix change). Why held rather than TP-sharded, with the measurements:
docs/design/vlm/towers.md.

How it behaves under the layouts:

- It lives on the first pipeline stage only (models/vlm.py builds it there, like the CLIP/SigLIP tower).
- Every TP rank holds the same weights (built under one fixed seed, then overwritten by loaded ones) and sees
  the same pixels, so it computes the same features and gets the same gradients: the gradient reaching the
  embedding output is whole on every TP rank (the first layer's column-parallel input all-reduces it; with
  sequence parallelism the scatter's backward all-gathers it).
- Its parameters carry no ``tensor_model_parallel`` attribute, so megatron-core treats them as replicated:
  DDP (and the distributed optimizer) reduce them over data parallelism like the norms, and
  ``param_is_not_tensor_parallel_duplicate`` counts them on TP rank 0 only in the gradient norm
  (tests/multiproc/test_qwen2_5_vl.py: 3 training steps with the tower training under TP=2+SP give the one-rank
  losses and gradient norms).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

# The seed every TP rank builds the tower under (its initial values are then identical everywhere; a loaded
# checkpoint overwrites them anyway).
TOWER_SEED = 1234

# transformers' attention implementation for the project's attention backend (models/attention.py): the
# reference "local" backend is transformers' "eager"; everything else runs torch's SDPA (TE has no hook into a
# transformers module).
_HF_ATTENTION = {"local": "eager"}


def hf_attention(backend_attention: str) -> str:
    """transformers' ``attn_implementation`` for the run's attention backend."""
    return _HF_ATTENTION.get(backend_attention, "sdpa")


class HeldTower(torch.nn.Module):
    """``hf``: the transformers vision module (a VLM's parameter ``vision_model.hf.<name>`` is the HF tensor
    ``<tower prefix><name>``); ``features(module, **media)`` -> [N_tokens, lm_hidden], the LM-width features of
    every image token of the micro-batch, in order."""

    def __init__(self, hf: torch.nn.Module, features: Callable[..., torch.Tensor]):
        super().__init__()
        self.hf = hf
        self._features = features

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def forward(self, **media) -> torch.Tensor:
        # Float16Module casts positional inputs only: floating media (pixels) come as keywords.
        media = {k: v.to(self.dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in media.items()}
        return self._features(self.hf, **media)


def build_held_tower(make: Callable[[str], torch.nn.Module], features: Callable[..., torch.Tensor],
                     backend_attention: str, device) -> HeldTower:
    """``make(attn_implementation)`` -> the transformers vision module (e.g. ``Cls._from_config(vision_config,
    attn_implementation=...)``), built in fp32 under :data:`TOWER_SEED` without touching the global RNG (the
    training run's random streams stay as they were)."""
    with torch.random.fork_rng(devices=[]), _default_dtype(torch.float32):
        torch.manual_seed(TOWER_SEED)
        module = make(hf_attention(backend_attention))
    return HeldTower(module, features).to(device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
