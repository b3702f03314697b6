"""LoRA adapters on megatron-core's tensor-parallel linears (column- and row-parallel, TE or local).

An adapter adds ``scale * B(A(dropout(x)))`` to a linear's output, with
``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). It is sharded so that
any TP size computes the same function as TP=1:

- column-parallel base (weight [out/tp, in]): A [r, in] is replicated and B
  [out/tp, r] is split like the weight. The r-dim activation goes through
  megatron-core's copy-to-TP region (backward: all-reduce), or under sequence
  parallelism is gathered along the sequence (backward: reduce-scatter), so
  A's gradient is the whole one (under SP it is summed over TP by
  finalize_model_grads, as for norms: A carries ``sequence_parallel``).
- row-parallel base (weight [out, in/tp]): A [r, in/tp] is split like the
  weight and B [out, r] is replicated. The partial r-dim products are summed
  over TP (all-reduce, or reduce-scatter along the sequence under SP), then B.

The adapter is a sibling of the linear (``linear_qkv`` gets
``linear_qkv_lora`` with parameters ``a`` and ``b``) and is added through a
forward hook, so the base keeps its name: HF loading, checkpoints and export
tables see the same model. It has its own sharded_state_dict (B of a SwiGLU
fc1 uses megatron-core's gate/up factory, as the weight does) and so is saved
in global coordinates like any weight. B starts at zero: the adapted model's
output equals the base's exactly at initialisation. A is drawn as PEFT draws
it (kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) from a generator
seeded by train.seed and the linear's global name, whole and then sliced, so
every layout starts from the same adapter.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from megatron_swift.tuners import LORA_TARGETS as TARGETS



def _tp_group(base):
    group = getattr(base, "tp_group", None)
    if group is not None:
        return group
    is_expert = not getattr(base.weight, "allreduce", True)
    return ps.get_expert_tensor_parallel_group() if is_expert else ps.get_tensor_model_parallel_group()


def _tp_attributes(param: torch.Tensor, dim: int) -> None:
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1


class LoRAAdapter(MegatronModule):
    """The low-rank update of one linear; ``column`` says how the base is split (see the module doc)."""

    def __init__(self, base, column: bool, rank: int, alpha: float, dropout: float, rslora: bool, seed: int,
                 name: str, gated: bool):
        super().__init__(base.config)
        self.column, self.gated = column, gated
        self.tp_group = _tp_group(base)
        tp, tp_rank = self.tp_group.size(), self.tp_group.rank()
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False)) and tp > 1
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = dropout
        out_local, in_local = base.weight.shape
        in_full = in_local if column else in_local * tp
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        bound = 1.0 / math.sqrt(in_full)
        a = torch.empty(rank, in_full).uniform_(-bound, bound, generator=generator)
        if not column:
            a = a.chunk(tp, dim=1)[tp_rank]
        b = torch.zeros(out_local, rank)
        dtype, device = base.weight.dtype, base.weight.device
        self.a = torch.nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.b = torch.nn.Parameter(b.to(device=device, dtype=dtype))
        split, replicated = (self.b, self.a) if column else (self.a, self.b)
        _tp_attributes(split, 0 if column else 1)
        if self.sequence_parallel:
            replicated.sequence_parallel = True  # its gradient covers this rank's sequence slice only
        for param in (self.a, self.b):
            param.is_lora = True
            if not getattr(base.weight, "allreduce", True):
                param.allreduce = False  # an expert's adapter: reduced over the expert data-parallel group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            if self.column:  # replicated input: the same mask on every TP rank (default generator)
                x = F.dropout(x, self.dropout)
            else:  # TP-split input: a mask per rank, from megatron-core's model-parallel RNG
                with get_cuda_rng_tracker().fork():
                    x = F.dropout(x, self.dropout)
        h = F.linear(x, self.a)
        if self.tp_group.size() > 1:
            if self.column:
                h = (gather_from_sequence_parallel_region(h, group=self.tp_group) if self.sequence_parallel
                     else copy_to_tensor_model_parallel_region(h, group=self.tp_group))
            else:
                h = (reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group) if self.sequence_parallel
                     else reduce_from_tensor_model_parallel_region(h, group=self.tp_group))
        return F.linear(h, self.b) * self.scale

    enabled = True  # False: the base model alone (a DPO/KTO reference without its own copy of the weights)

    def hook(self, module, args, output):
        """Forward hook on the base linear: its (output, bias) with the update added to the output."""
        if not self.enabled:
            return output
        out, bias = output
        return out + self(args[0]).to(out.dtype), bias

    def delta(self) -> torch.Tensor:
        """``scale * B @ A``: the update of this rank's block of the base weight (for merging)."""
        return (self.b.float() @ self.a.float()) * self.scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        axes = {"b": 0} if self.column else {"a": 1}
        sharded = make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets, tp_group=self.tp_group,
                                                      dp_cp_group=metadata["dp_cp_group"])
        if self.gated:  # B's rows follow fc1's [gate; up] layout per TP rank
            key = f"{prefix}b"
            sharded[key] = apply_swiglu_sharded_factory(sharded[key], sharded_offsets,
                                                        (metadata or {}).get("singleton_local_shards", False))
        return sharded


def _is_parallel_linear(module) -> bool:
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(weight, "partition_dim", None) in (0, 1) and hasattr(module, "config"))


def attach(chunks, tuner, seed: int, global_name) -> list:
    """Add adapters to the targeted linears of the chunks; returns their global names.

    ``global_name(chunk_index, local_name)`` gives the name users' regexes see."""
    import re

    pattern = re.compile(tuner.target_regex) if tuner.target_regex else None
    wanted = set(TARGETS if "all-linear" in tuner.target_modules else tuner.target_modules)
    adapted = []
    for index, chunk in enumerate(chunks):
        for local, module in list(chunk.named_modules()):
            leaf = local.rsplit(".", 1)[-1]
            if leaf not in TARGETS or ".layers." not in f".{local}" or not _is_parallel_linear(module):
                continue
            name = global_name(index, local)
            # target_modules name the language model's linears; a VLM's encoder only through target_regex.
            if not (pattern.fullmatch(name) if pattern else leaf in wanted and not local.startswith("vision_model.")):
                continue
            parent = chunk.get_submodule(local.rsplit(".", 1)[0])
            adapter = LoRAAdapter(module, module.weight.partition_dim == 0, tuner.rank, tuner.alpha, tuner.dropout,
                                  tuner.rslora, seed, name,
                                  gated=leaf == "linear_fc1" and module.config.gated_linear_unit)
            parent.add_module(f"{leaf}_lora", adapter)
            module.register_forward_hook(adapter.hook)
            adapted.append(name)
    return adapted


class adapters_disabled:
    """Context in which the model's LoRA adapters add nothing: the frozen base model."""

    def __init__(self, model):
        self.adapters = [m for chunk in model for m in chunk.modules() if isinstance(m, LoRAAdapter)]

    def __enter__(self):
        for adapter in self.adapters:
            adapter.enabled = False
        return self

    def __exit__(self, *exc):
        for adapter in self.adapters:
            adapter.enabled = True
