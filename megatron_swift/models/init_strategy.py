"""model.init_strategy: the values of every parameter not loaded from a checkpoint, the same under every layout.

Each tensor is generated whole, in its Hugging Face form (q, k, v, gate and up apart, the vocabulary unpadded),
by ``torch.nn.init`` from a generator seeded with train.seed and the tensor's HF name; each rank then takes its
shard through the family's weight table, exactly as it would read that tensor from an HF checkpoint
(convert/rules.py). So TP, PP and EP layouts hold the same model, and fan-in / fan-out are those of the HF
projection (what ``torch.nn.init`` on the transformers module would use), not of Megatron's fused matrices.
Parameters the table does not know (a reward head) are generated whole in their Megatron shape, seeded by name.

One-dimensional parameters (norm scales, biases) keep megatron-core's values (ones, zeros): the strategies are
matrix initialisations.
"""
from __future__ import annotations

import math
import re
import zlib
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.nn import init

from megatron_swift.models.init_names import STRATEGY_NAMES

# name -> fn(tensor, generator, std); std is model.init_method_std (normal, uniform)
STRATEGIES: Dict[str, Callable] = {
    "normal": lambda t, g, std: init.normal_(t, 0.0, std, generator=g),
    "zero": lambda t, g, std: init.zeros_(t),
    # Same standard deviation as normal: U(-a, a) has std a / sqrt(3).
    "uniform": lambda t, g, std: init.uniform_(t, -std * math.sqrt(3.0), std * math.sqrt(3.0), generator=g),
    "xavier_uniform": lambda t, g, std: init.xavier_uniform_(t, generator=g),
    "xavier_normal": lambda t, g, std: init.xavier_normal_(t, generator=g),
    "kaiming_uniform": lambda t, g, std: init.kaiming_uniform_(t, generator=g),
    "kaiming_normal": lambda t, g, std: init.kaiming_normal_(t, generator=g),
    "orthogonal": lambda t, g, std: init.orthogonal_(t, generator=g),
}

assert tuple(STRATEGIES) == STRATEGY_NAMES  # validation reads the names without importing torch


def generate(strategy: str, shape: Tuple[int, ...], name: str, seed: int, std: float) -> torch.Tensor:
    """The whole tensor ``name`` (fp32, CPU) under ``strategy``: the same on every rank and layout."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    tensor = torch.empty(shape, dtype=torch.float32)
    STRATEGIES[strategy](tensor, generator, std)
    return tensor


class SeededTensors:
    """A ``convert.rules.Reader`` whose tensors are generated instead of read: HF name -> shape is given."""

    def __init__(self, shapes: Dict[str, Tuple[int, ...]], strategy: str, seed: int, std: float):
        self.shapes, self.strategy, self.seed, self.std = shapes, strategy, seed, std
        self._last: Optional[Tuple[str, torch.Tensor]] = None  # fused rules read one tensor in several slices

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.shapes[name]

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = (name, generate(self.strategy, self.shapes[name], name, self.seed, self.std))
        rows = slice(start, stop)
        full = self._last[1]
        return full[rows] if dim == 0 else full[:, rows]


def full_shape(param, tp: int) -> Tuple[int, ...]:
    """The unsharded Megatron shape of a (possibly tensor-parallel) parameter."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return tuple(shape)



def shard_of(name: str, param, rules, offsets, ctx, tp_rank: int, strategy: str, seed: int,
             std: float) -> torch.Tensor:
    """This rank's shard of parameter ``name`` under ``strategy``: built through the weight table from whole
    generated HF tensors, or (no rule for it, or a shape the table does not give) cut from the whole
    Megatron-shaped tensor seeded by its name."""
    from megatron_swift.convert.hf_load import match_rule
    from megatron_swift.convert.rules import Part
    from megatron_swift.data.errors import DataError

    tp = ctx.tp
    part = Part(param.partition_dim, tp_rank, tp) if getattr(param, "tensor_model_parallel", False) else None
    shape = full_shape(param, tp)
    try:
        rule, layer = match_rule(name, rules, offsets, "init")
        hf = rule.split(torch.empty(shape, device="meta"), layer, ctx)
        # a stacked-experts tensor (convert/rules.StackedExperts): split gives one expert's slice of it
        stacked = getattr(rule, "experts", 0)
        shapes = {n: (stacked, *t.shape[1:]) if stacked else tuple(t.shape) for n, t in hf.items()}
        shard = rule.build(SeededTensors(shapes, strategy, seed, std), layer, ctx, part)
        if tuple(shard.shape) == tuple(param.shape):
            return shard
    except (DataError, KeyError, RuntimeError, ValueError):  # no table entry, or shapes it cannot split
        pass
    full = generate(strategy, shape, "megatron:" + name, seed, std)
    return full if part is None else full.chunk(part.count, dim=part.dim)[part.rank]


def apply(chunks, arch, padded_vocab: int, strategy: str, seed: int, std: float, wanted) -> Dict[str, int]:
    """Set every matrix parameter ``wanted(name, param)`` selects to its ``strategy`` values; returns
    {group of names: tensors} for the start line."""
    from megatron_swift.convert.hf_load import param_sources

    done: Dict[str, int] = {}
    for name, param, rules, offsets, ctx, rank in param_sources(chunks, arch, padded_vocab):
        if param.dim() < 2 or not wanted(name, param):
            continue
        shard = shard_of(name, param, rules, offsets, ctx, rank, strategy, seed, std)
        with torch.no_grad():
            param.copy_(shard.to(param.dtype))
        group = re.sub(r"\.\d+\.", ".*.", name)
        done[group] = done.get(group, 0) + 1
    return done
