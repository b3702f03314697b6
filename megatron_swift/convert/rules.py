"""Typed rules of a weight table: how one Megatron parameter is made from HF tensors, and back.

Names carry ``{layer}`` (global layer index) and ``{expert}`` (global expert
index) wildcards. A rule's ``mcore`` is a tuple of alternative Megatron names
for the same tensor (local-spec and Transformer-Engine-spec spellings differ).

``build`` reads only what one rank needs: given a ``Part`` (block ``rank`` of
``count`` along ``dim`` of the Megatron tensor) it asks the reader for row
ranges of the HF tensors instead of whole tensors. ``split`` is the inverse on
an unsharded Megatron tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Tuple

import torch


@dataclass(frozen=True)
class Part:
    """The block of a Megatron tensor one rank holds: block ``rank`` of ``count`` equal blocks along ``dim``."""

    dim: int
    rank: int
    count: int


class Reader(Protocol):
    def shape(self, name: str) -> Tuple[int, ...]: ...

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """Rows ``start:stop`` along ``dim`` (0 or 1) of tensor ``name``; the whole tensor by default."""


def _block(size: int, part: Optional[Part]) -> Tuple[int, int]:
    if part is None:
        return 0, size
    step = size // part.count
    return part.rank * step, (part.rank + 1) * step


def _cut(full: torch.Tensor, part: Optional[Part]) -> torch.Tensor:
    return full if part is None else full.chunk(part.count, dim=part.dim)[part.rank]


@dataclass(frozen=True)
class Direct:
    """One HF tensor as it is; ``pad_vocab`` zero-pads rows up to the padded vocabulary; ``fp32``: written in
    float32 whatever the export's dtype (a router's selection bias, which checkpoints keep in float32)."""

    mcore: Tuple[str, ...]
    hf: str
    pad_vocab: bool = False
    fp32: bool = False

    def hf_names(self):
        return (self.hf,)

    def build(self, reader: Reader, layer: Dict[str, str], ctx, part: Optional[Part] = None) -> torch.Tensor:
        name = self.hf.format(**layer)
        shape = reader.shape(name)
        dim = part.dim if part else 0
        padded = self.pad_vocab and dim == 0
        start, stop = _block(ctx.padded_vocab if padded else shape[dim], part)
        real_stop = min(stop, shape[dim])
        tensor = reader.read(name, dim, min(start, real_stop), real_stop)
        if padded and tensor.shape[0] < stop - start:  # this block reaches into the padding rows
            pad = tensor.new_zeros((stop - start - tensor.shape[0],) + tuple(tensor.shape[1:]))
            tensor = torch.cat([tensor, pad])
        return tensor

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        """The HF tensor (vocabulary padding removed)."""
        if self.pad_vocab:
            full = full[: ctx.vocab_size]
        return {self.hf.format(**layer): full}


@dataclass(frozen=True)
class QKV:
    """Q, K, V projections fused in Megatron's order: per query group, its queries then its key and value.

    Tensor parallelism splits whole query groups, so a rank's block is read as
    its groups' rows of each of Q, K and V."""

    mcore: Tuple[str, ...]
    q: str
    k: str
    v: str

    def hf_names(self):
        return (self.q, self.k, self.v)

    def build(self, reader: Reader, layer: Dict[str, str], ctx, part: Optional[Part] = None) -> torch.Tensor:
        if part is not None and part.dim != 0:
            return _cut(self.build(reader, layer, ctx), part)
        q_name, k_name, v_name = (n.format(**layer) for n in (self.q, self.k, self.v))
        groups, d = ctx.num_query_groups, ctx.kv_channels
        g0, g1 = _block(groups, part)
        q_per_group = reader.shape(q_name)[0] // groups
        q = reader.read(q_name, 0, g0 * q_per_group, g1 * q_per_group)
        k = reader.read(k_name, 0, g0 * d, g1 * d)
        v = reader.read(v_name, 0, g0 * d, g1 * d)
        rest = tuple(q.shape[1:])
        n = g1 - g0
        fused = torch.cat([q.reshape(n, -1, *rest), k.reshape(n, d, *rest), v.reshape(n, d, *rest)], dim=1)
        return fused.reshape(-1, *rest)

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        groups, d = ctx.num_query_groups, ctx.kv_channels
        rest = tuple(full.shape[1:])
        per_group = full.reshape(groups, -1, *rest)
        q_rows = per_group.shape[1] - 2 * d
        q, k, v = per_group.split([q_rows, d, d], dim=1)
        return {n.format(**layer): t.reshape(-1, *rest).contiguous() for n, t in ((self.q, q), (self.k, k), (self.v, v))}


@dataclass(frozen=True)
class GateUp:
    """SwiGLU gate and up projections fused as Megatron's linear_fc1.

    Megatron shards fc1 so that each TP rank holds [gate_r; up_r]; the full
    tensor is therefore the concatenation of those per-rank blocks (``ctx.tp``
    of them: the expert TP size for experts), which an even split over TP ranks
    turns back into the right shards."""

    mcore: Tuple[str, ...]
    gate: str
    up: str

    def hf_names(self):
        return (self.gate, self.up)

    def build(self, reader: Reader, layer: Dict[str, str], ctx, part: Optional[Part] = None) -> torch.Tensor:
        gate, up = self.gate.format(**layer), self.up.format(**layer)
        if part is not None and part.dim == 0 and part.count == ctx.tp:
            start, stop = _block(reader.shape(gate)[0], part)
            return torch.cat([reader.read(gate, 0, start, stop), reader.read(up, 0, start, stop)])
        blocks = [torch.cat([g, u]) for g, u in zip(reader.read(gate).chunk(ctx.tp), reader.read(up).chunk(ctx.tp))]
        return _cut(torch.cat(blocks), part)

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        blocks = [b.chunk(2) for b in full.chunk(ctx.tp)]
        gate = torch.cat([g for g, _ in blocks])
        up = torch.cat([u for _, u in blocks])
        return {self.gate.format(**layer): gate.contiguous(), self.up.format(**layer): up.contiguous()}


@dataclass(frozen=True)
class Reshape:
    """One HF tensor under another shape (CLIP's class embedding [h] is megatron-core's [1, 1, h]); not
    tensor-parallel. ``shape`` / ``hf_shape`` may hold one -1."""

    mcore: Tuple[str, ...]
    hf: str
    shape: Tuple[int, ...]
    hf_shape: Tuple[int, ...] = (-1,)

    def hf_names(self):
        return (self.hf,)

    def build(self, reader: Reader, layer: Dict[str, str], ctx, part: Optional[Part] = None) -> torch.Tensor:
        return _cut(reader.read(self.hf.format(**layer)).reshape(self.shape), part)

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        return {self.hf.format(**layer): full.reshape(self.hf_shape).contiguous()}


@dataclass(frozen=True)
class SwapHalves:
    """One HF tensor whose two column halves Megatron holds the other way round: MiMo's MTP ``input_proj``
    takes [hidden; embedding], megatron-core's ``eh_proj`` [embedding; hidden] (the same matrix, columns
    swapped); rows split over TP as they are."""

    mcore: Tuple[str, ...]
    hf: str

    def hf_names(self):
        return (self.hf,)

    def build(self, reader: Reader, layer: Dict[str, str], ctx, part: Optional[Part] = None) -> torch.Tensor:
        name = self.hf.format(**layer)
        rows = reader.shape(name)[0]
        start, stop = _block(rows, part if part is not None and part.dim == 0 else None)
        first, second = reader.read(name, 0, start, stop).chunk(2, dim=1)
        full = torch.cat([second, first], dim=1)
        return full if part is None or part.dim == 0 else _cut(full, part)

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        embedding, hidden = full.chunk(2, dim=1)
        return {self.hf.format(**layer): torch.cat([hidden, embedding], dim=1).contiguous()}


class _Rows:
    """A reader that shows row blocks of one HF tensor as tensors of their own (``blocks``: name -> (first row,
    rows)), so that a fused HF tensor is read by the rules of the unfused ones, one rank's rows at a time."""

    def __init__(self, reader: Reader, name: str, blocks: Dict[str, Tuple[int, int]]):
        self.reader, self.name, self.blocks = reader, name, blocks

    def shape(self, name: str) -> Tuple[int, ...]:
        return (self.blocks[name][1],) + tuple(self.reader.shape(self.name)[1:])

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        first, rows = self.blocks[name]
        if dim == 0:
            return self.reader.read(self.name, 0, first + (start or 0), first + (rows if stop is None else stop))
        return self.reader.read(self.name, 0, first, first + rows)[:, start:stop]


@dataclass(frozen=True)
class FusedQKV:
    """One HF tensor holding all queries, then all keys, then all values (Phi-3's ``qkv_proj``), as Megatron's
    per-query-group QKV: read and split by :class:`QKV`'s rules over its three row blocks."""

    mcore: Tuple[str, ...]
    hf: str

    def hf_names(self):
        return (self.hf,)

    def _blocks(self, rows: int, ctx) -> Dict[str, Tuple[int, int]]:
        kv = ctx.num_query_groups * ctx.kv_channels
        return {"q": (0, rows - 2 * kv), "k": (rows - 2 * kv, kv), "v": (rows - kv, kv)}

    def build(self, reader: Reader, layer: Dict[str, str], ctx, part: Optional[Part] = None) -> torch.Tensor:
        name = self.hf.format(**layer)
        rows = _Rows(reader, name, self._blocks(reader.shape(name)[0], ctx))
        return QKV(self.mcore, "q", "k", "v").build(rows, {}, ctx, part)

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        parts = QKV(self.mcore, "q", "k", "v").split(full, {}, ctx)
        return {self.hf.format(**layer): torch.cat([parts["q"], parts["k"], parts["v"]])}


@dataclass(frozen=True)
class FusedGateUp:
    """One HF tensor holding the gate rows, then the up rows (Phi-3's ``gate_up_proj``), as Megatron's fc1:
    read and split by :class:`GateUp`'s rules over its two halves."""

    mcore: Tuple[str, ...]
    hf: str

    def hf_names(self):
        return (self.hf,)

    def build(self, reader: Reader, layer: Dict[str, str], ctx, part: Optional[Part] = None) -> torch.Tensor:
        name = self.hf.format(**layer)
        half = reader.shape(name)[0] // 2
        return GateUp(self.mcore, "gate", "up").build(_Rows(reader, name, {"gate": (0, half), "up": (half, half)}),
                                                       {}, ctx, part)

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        parts = GateUp(self.mcore, "gate", "up").split(full, {}, ctx)
        return {self.hf.format(**layer): torch.cat([parts["gate"], parts["up"]])}


class _Tensors:
    """A reader over tensors already in memory (name -> tensor), for rules that reuse another rule's slicing."""

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        rows = slice(start, stop)
        return self.tensors[name][rows] if dim == 0 else self.tensors[name][:, rows]


@dataclass(frozen=True)
class StackedExperts:
    """One HF tensor holding every routed expert of a layer along dim 0 (transformers 5's fused experts:
    Qwen3-VL-MoE's ``experts.gate_up_proj`` [E, 2I, H], gate rows then up rows, and ``experts.down_proj``
    [E, H, I]) as Megatron's one tensor per expert (``{expert}`` in ``mcore``). ``gate_up``: fc1, split over
    expert-TP ranks as :class:`GateUp`; else fc2. ``hidden``: the model width, which tells the layouts apart:
    checkpoints saved by transformers 4.57 (the published Qwen3-VL-MoE ones) hold each expert transposed
    ([E, H, 2I], [E, I, H]); like transformers 5's loader (its ``Transpose(check_dims=True)``), an expert is
    transposed when it is not in the module's layout. Export writes transformers 5's layout; to_hf.hf_tensors
    stacks the ``experts`` pieces :meth:`split` gives."""

    mcore: Tuple[str, ...]
    hf: str
    experts: int
    hidden: int
    gate_up: bool = False

    def hf_names(self):
        return (self.hf,)

    def _expert(self, reader: Reader, layer: Dict[str, str]) -> torch.Tensor:
        index = int(layer["expert"])
        matrix = reader.read(self.hf.format(**layer), 0, index, index + 1)[0]
        in_layout = matrix.shape[1] == self.hidden if self.gate_up else matrix.shape[0] == self.hidden
        return matrix if in_layout else matrix.t()

    def build(self, reader: Reader, layer: Dict[str, str], ctx, part: Optional[Part] = None) -> torch.Tensor:
        matrix = self._expert(reader, layer)
        if not self.gate_up:
            return _cut(matrix, part)
        gate, up = matrix.chunk(2)
        return GateUp(self.mcore, "gate", "up").build(_Tensors({"gate": gate, "up": up}), {}, ctx, part)

    def split(self, full: torch.Tensor, layer: Dict[str, str], ctx) -> Dict[str, torch.Tensor]:
        """This expert's [1, ...] piece of the stacked tensor."""
        if self.gate_up:
            parts = GateUp(self.mcore, "gate", "up").split(full, {}, ctx)
            full = torch.cat([parts["gate"], parts["up"]])
        return {self.hf.format(**layer): full.unsqueeze(0)}
