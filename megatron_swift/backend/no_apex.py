"""Fast paths where megatron-core 0.16 falls back to slow code without Apex or Transformer Engine.

Without Apex/TE (a plain ``pip install``), megatron-core 0.16.1's optimizer uses:

- ``torch.optim.AdamW`` built without ``fused``: the foreach implementation,
  which makes several passes over the fp32 master weights, grads and moments
  where torch's fused kernel makes one (about 3x the memory traffic; at 2.8 B
  parameters that is ~60 ms of every step on an H100);
- ``megatron.core.utils.local_multi_tensor_scale``: a Python loop of
  ``dst.copy_(src * scale)``, one temporary per tensor, for copying the fp32
  master weights into the bf16 model after every step and for gradient clipping;
- ``megatron.core.utils.local_multi_tensor_l2_norm``: a norm per tensor and a
  host round trip per tensor (``torch.tensor(list_of_device_scalars)``), with the
  result hard-coded onto ``cuda``.

This module replaces them with torch's own fused and foreach kernels (same
results: the copies and scalings are bitwise equal; the norm is the same fp32
sum in another order) in this one place, and only where megatron-core picked
its local fallbacks: with Apex or TE installed, theirs stay.

Gradient accumulation fusion (``gradient_accumulation_fusion``) needs Apex's
``fused_weight_gradient_mlp_cuda``: each linear's weight gradient is a GEMM that
adds into the fp32 ``main_grad`` directly. Without it, megatron-core writes a
bf16 gradient and its DDP hook adds it into ``main_grad``: one more read and
write of every gradient per micro-batch (47 ms of a 545 ms step at qwen3-8b
width on an H100). :func:`install_wgrad_accumulation` gives megatron-core that
module's one entry point on ``torch.addmm`` with an fp32 output (cuBLAS
accumulates bf16 products into the fp32 buffer), after checking on the device
that this torch computes it right.
"""
from __future__ import annotations

import torch

_APPLIED = False


def _l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``local_multi_tensor_l2_norm``: the global L2 norm of the tensors, on their device."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for ``local_multi_tensor_scale`` (``dst = src * scale``, cast to dst's dtype), in foreach kernels."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def apply() -> None:
    """Swap megatron-core's local multi-tensor fallbacks for the foreach versions (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer

    for module in (clip_grads, optimizer):
        if getattr(module, "multi_tensor_scale_impl", None) is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _scale
    if getattr(clip_grads, "l2_norm_impl", None) is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _l2_norm
    _APPLIED = True


def torch_optimizers(optimizer) -> list:
    """The torch optimizers under megatron-core's (chained) wrappers."""
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if getattr(o, "optimizer", None) is not None]


def fuse_adam(optimizer) -> None:
    """Run torch's AdamW under megatron-core's optimizer with the fused kernel (CUDA, and CPU since torch 2.4).

    Idempotent; also after a checkpoint load: the fused kernel keeps each parameter's ``step`` as an fp32
    tensor on the parameter's device, so steps loaded elsewhere are moved there."""
    for inner in torch_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue  # Apex's or TE's fused Adam
        for group in inner.param_groups:
            if group.get("differentiable") or not all(p.is_floating_point() for p in group["params"]):
                continue
            group["fused"], group["foreach"] = True, False
            for p in group["params"]:
                state = inner.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


class _WgradAccumulation:
    """Apex's ``fused_weight_gradient_mlp_cuda`` entry points (the ones megatron-core's linears call)."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t(), total_input)


def _accumulates_right(device: torch.device) -> bool:
    """Whether this torch adds a bf16 GEMM into an fp32 buffer in place on the device, correctly."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x, dy = (torch.randn(64, n, generator=g).to(device, torch.bfloat16) for n in (48, 32))
    acc = torch.randn(32, 48, generator=g).to(device)
    expected = acc + dy.float().t() @ x.float()
    try:
        _WgradAccumulation.wgrad_gemm_accum_fp32(x, dy, acc)
    except (RuntimeError, TypeError, NotImplementedError):  # no fp32-output addmm for this device/torch
        return False
    return bool(torch.allclose(acc, expected, rtol=1e-3, atol=1e-3))


def install_wgrad_accumulation(device: torch.device) -> bool:
    """Let megatron-core's linears use gradient accumulation fusion: Apex's module where it is installed,
    else :class:`_WgradAccumulation` where :func:`_accumulates_right`. True when fusion can be used."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return True
    if not _accumulates_right(device):
        return False
    layers.fused_weight_gradient_mlp_cuda = _WgradAccumulation
    layers._grad_accum_fusion_available = True
    return True
