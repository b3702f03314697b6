"""Norm modules in layer specs: a plain-torch norm that works with sequence parallelism, and unfused TE norms.

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


def unfuse_layernorm_linears(spec) -> None:
    """Turn TE's LayerNorm-fused QKV and fc1 linears into a separate TE norm plus a plain TE linear, in place.

    A fused linear normalises inside the module, so a LoRA forward hook on it would see the un-normalised
    input. The separate norm takes the spec slot megatron-core's local spec uses (input_layernorm,
    pre_mlp_layernorm); its checkpoint keys are mapped back to the fused names (as megatron-core's local
    spec does), so checkpoints are interchangeable with fused runs. Needs Transformer Engine."""
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TENorm,
    )

    for layer in getattr(spec, "layer_specs", [spec]):
        sub = layer.submodules
        attention = getattr(sub.self_attention, "submodules", None)
        keys = dict(sub.sharded_state_dict_keys_map or {})
        if attention is not None and attention.linear_qkv is TELayerNormColumnParallelLinear:
            attention.linear_qkv, sub.input_layernorm = TEColumnParallelLinear, TENorm
            keys["input_layernorm."] = "self_attention.linear_qkv.layer_norm_"
        mlp = getattr(sub.mlp, "submodules", None)
        if getattr(mlp, "linear_fc1", None) is TELayerNormColumnParallelLinear:
            mlp.linear_fc1, sub.pre_mlp_layernorm = TEColumnParallelLinear, TENorm
            keys["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
        sub.sharded_state_dict_keys_map = keys
