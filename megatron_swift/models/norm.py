"""A plain-torch norm that also works with sequence parallelism.

megatron-core 0.16's ``WrappedTorchNorm`` (used by the local, non-TE specs when
Apex is absent) refuses ``sequence_parallel``. The refusal is only about
gradients: under SP each TP rank sees a slice of the sequence, so norm weight
grads must be summed over TP. megatron-core's ``finalize_model_grads`` does
that sum for every parameter tagged ``sequence_parallel=True``; this class tags
them, and is otherwise torch's LayerNorm/RMSNorm.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm


class TorchNorm:
    """Drop-in for ``WrappedTorchNorm`` with the SP gradient tag."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        norm = WrappedTorchNorm(dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def swap_torch_norms(spec) -> None:
    """Replace ``WrappedTorchNorm`` by :class:`TorchNorm` throughout a layer/block spec, in place."""
    seen = set()

    def visit(node):
        if node is None or id(node) in seen or isinstance(node, (str, int, float, bool, torch.dtype, type)):
            return
        seen.add(id(node))
        if isinstance(node, (list, tuple)):
            for item in node:
                visit(item)
            return
        if not dataclasses.is_dataclass(node):
            return
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if value is WrappedTorchNorm:
                setattr(node, f.name, TorchNorm)
            else:
                visit(value)

    visit(spec)
