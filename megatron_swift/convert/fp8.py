"""FP8 checkpoints with block scales (DeepSeek-V3/R1, Kimi-K2 as published), dequantized while reading.

Such a folder's config.json carries ``quantization_config: {quant_method: fp8, weight_block_size: [128, 128],
...}`` and every quantized ``X.weight`` (float8_e4m3fn) has an ``X.weight_scale_inv`` holding one float per
block of ``weight_block_size`` rows x columns: the real weight is ``weight * scale_inv`` of its block. The
reader below gives the rules those products (float32; the parameter's copy casts to the training dtype) for the
rows a rank asks for, so a tensor-parallel rank dequantizes only its shard. Training and export then see plain
weights: an export writes the training dtype and no ``quantization_config`` (hf_export says so).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from megatron_swift.data.errors import DataError

SUPPORTED = ("fp8",)
_SCALE = "_scale_inv"


def block_size(hf: dict, folder: str) -> Optional[Tuple[int, int]]:
    """The (rows, columns) of one scale block, or None for a checkpoint without quantization."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    where = os.path.join(folder, "config.json")
    if method not in SUPPORTED:
        raise DataError(where, None, f"quantization_config.quant_method={method!r} is not supported; supported: "
                                     f"{', '.join(SUPPORTED)} (or an unquantized checkpoint)")
    if quant.get("activation_scheme", "dynamic") != "dynamic" or quant.get("fmt", "e4m3") != "e4m3":
        raise DataError(where, None, "quantization_config: only fmt=e4m3 with activation_scheme=dynamic is "
                                     "supported (DeepSeek-V3's FP8 blocks)")
    block = quant.get("weight_block_size") or (128, 128)
    if len(block) != 2:
        raise DataError(where, None, f"quantization_config.weight_block_size={block}: expected [rows, columns]")
    return int(block[0]), int(block[1])


def is_scale(name: str) -> bool:
    """Whether an HF tensor is a block scale (read with its weight, never written on its own)."""
    return name.endswith(_SCALE)


class Dequantizing:
    """A safetensors reader (hf_load.SafetensorsFolder) whose FP8 weights read as ``weight x scale_inv``."""

    def __init__(self, reader, block: Tuple[int, int]):
        self.inner, self.block = reader, block
        # the scales are read with their weights: they are no weight of their own for the rules
        self.inner.used.update(n for n in reader.file_of if n.endswith(_SCALE))

    def __getattr__(self, name):  # folder, file_of, used, ...: the wrapped reader's
        return getattr(self.inner, name)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.inner.shape(name)

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        tensor = self.inner.read(name, dim, start, stop)
        scale_name = name + _SCALE
        if scale_name not in self.inner.file_of:
            return tensor
        return dequantize(tensor, self.inner.read(scale_name), self.block, self.inner.shape(name), dim, start or 0)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: Tuple[int, int], full_shape, dim: int = 0,
               start: int = 0) -> torch.Tensor:
    """float32 ``weight x scale_inv`` of its block, for ``weight`` = rows (dim 0) or columns (dim 1) from
    ``start`` of a tensor of ``full_shape``."""
    offsets = [0, 0]
    offsets[dim] = start
    rows = (torch.arange(weight.shape[0]) + offsets[0]) // block[0]
    cols = (torch.arange(weight.shape[1]) + offsets[1]) // block[1]
    if tuple(scale_inv.shape) != tuple(-(-n // b) for n, b in zip(full_shape, block)):
        raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)} does not fit a weight of shape "
                         f"{tuple(full_shape)} in blocks of {block}")
    return weight.float() * scale_inv.float()[rows][:, cols]


def quantize(weight: torch.Tensor, block: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv per block): each block scaled so its largest value is FP8's
    largest (what DeepSeek's published weights hold); used by tests to make FP8 checkpoints."""
    finfo = torch.finfo(torch.float8_e4m3fn)
    r, c = (-(-n // b) for n, b in zip(weight.shape, block))
    padded = torch.zeros(r * block[0], c * block[1])
    padded[: weight.shape[0], : weight.shape[1]] = weight.float()
    blocks = padded.view(r, block[0], c, block[1])
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / finfo.max
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(r * block[0], c * block[1])
    return q[: weight.shape[0], : weight.shape[1]].contiguous(), scale
