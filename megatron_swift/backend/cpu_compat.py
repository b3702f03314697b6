"""Compatibility patches that let megatron-core 0.16.x run on CPU with gloo.

megatron-core assumes CUDA in a handful of code paths even when the model is on
CPU. Every such assumption is patched here, in one place, with the reason, so
the rest of megatron-swift never branches on the device. Applied only by the
CPU backend (``backend.device.init``), never when CUDA is in use.

Measured against megatron-core 0.16.1 with torch 2.13 (CPU build).
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch

_APPLIED = False
_CPU = torch.device("cpu")


def _cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``0``, ``torch.device("cuda:1")``) to CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _wrap_factory(fn):
    """Tensor factories called with ``device='cuda'`` (or an int) allocate on CPU instead, and unpinned:
    pinned host memory needs an accelerator (megatron-core's per-CP-rank RoPE slicing pins its index)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return wrapper


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "empty_like", "zeros_like", "ones_like", "full_like", "as_tensor", "linspace",
)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: CPU ops are synchronous, so waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _NullEvent:
    """Stands in for ``torch.cuda.Event``."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _patch_rng():
    """``tensor_parallel.random`` keeps named CUDA RNG states (model-parallel,
    data-parallel, expert) and swaps them with ``torch.cuda.{get,set}_rng_state``.
    On CPU the same tracker semantics hold if those calls swap the CPU generator."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    # The tracker's fork() warns when the CPU generator moved inside it ("CPU RNG state changed within GPU RNG
    # context"): here the "GPU" generator IS the CPU one, so every dropout inside a fork (LoRA dropout: 16
    # lines a step) moves it by design. Only that message is dropped.
    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: record.getMessage() != "CPU RNG state changed within GPU RNG context")


def _quiet_cuda_stream_advice():
    """The tensor-parallel linear warns once per process, under TP>1 or SP, to set CUDA_DEVICE_MAX_CONNECTIONS=1
    (the order of CUDA streams' communication and compute): advice about CUDA streams, which a CPU run does not
    have. Its own "already warned" flag is set."""
    from megatron.core.tensor_parallel import layers

    layers.linear_with_grad_accumulation_and_async_allreduce.warned = True


def _patch_devices():
    """``torch.cuda.current_device()`` is used as a ``device=`` argument and
    ``.cuda()`` moves buffers (DDP grad buffers, optimizer state, loss
    reductions); both become CPU."""
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.device_count = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NullStream
    torch.cuda.Event = _NullEvent
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    for name in _FACTORIES:
        setattr(torch, name, _wrap_factory(getattr(torch, name)))
    original_to = torch.Tensor.to

    @functools.wraps(original_to)
    def to(self, *args, **kwargs):
        if not kwargs and len(args) == 1 and isinstance(args[0], torch.dtype):
            return original_to(self, args[0])  # the common .to(dtype): no device to map (runs per layer)
        args = tuple(_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return original_to(self, *args, **kwargs)

    torch.Tensor.to = to


def _patch_tensor_type():
    """The optimizers check ``param.type() == 'torch.cuda.FloatTensor'`` (and
    Half/BFloat16) to sort parameters into fp32 and fp16 groups
    (``optimizer.py``, ``distrib_optimizer.py``, ``clip_grads.py``). A CPU
    tensor answers the CUDA name when asked with no argument, so the same
    grouping happens; ``type(dtype)`` conversions are untouched."""
    original_type = torch.Tensor.type

    @functools.wraps(original_type)
    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type


def _patch_moe():
    """``moe_utils`` references ``te_general_gemm`` in the router GEMM even
    though its guarded import leaves the name undefined without Transformer
    Engine; defining it as None selects the plain-torch branch."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_all_to_all():
    """The alltoall MoE dispatcher passes split sizes as tensors; NCCL's binding
    accepts them, gloo's wants sequences of ints."""
    original = torch.distributed.all_to_all_single

    @functools.wraps(original)
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    torch.distributed.all_to_all_single = all_to_all_single


def apply() -> None:
    """Install every patch once; safe to call repeatedly."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_devices()
    _patch_rng()
    _patch_tensor_type()
    _patch_moe()
    _patch_all_to_all()
    _quiet_cuda_stream_advice()
    _APPLIED = True
