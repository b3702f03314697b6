"""backend.no_apex: the foreach replacements compute what megatron-core's local fallbacks compute, and
megatron-core's optimizer runs torch's fused AdamW."""
from __future__ import annotations

import torch
from megatron.core import utils
from megatron.core.optimizer import clip_grads

from megatron_swift.backend import no_apex


def tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((7, 5), (13,), (3, 4, 2))]


def test_scale_equals_megatron_cores_local_fallback_bitwise():
    for scale in (1.0, 0.37):
        src = tensors()
        ours, theirs = tensors(1, torch.bfloat16), tensors(1, torch.bfloat16)
        no_apex._scale(0, None, [src, ours], scale)
        utils.local_multi_tensor_scale(0, None, [src, theirs], scale)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
        ours, theirs = tensors(2), tensors(2)  # in place (gradient clipping)
        no_apex._scale(0, None, [ours, ours], scale)
        utils.local_multi_tensor_scale(0, None, [theirs, theirs], scale)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_l2_norm_is_the_global_norm_computed_by_hand():
    grads = tensors(3)
    by_hand = sum(float((g.double() ** 2).sum()) for g in grads) ** 0.5
    norm, per_tensor = no_apex._l2_norm(0, None, [grads], False)
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    assert abs(float(norm) - by_hand) < 1e-5 * by_hand


def test_apply_replaces_only_the_local_fallbacks():
    no_apex.apply()
    from megatron.core.optimizer import optimizer

    assert clip_grads.l2_norm_impl is no_apex._l2_norm
    assert clip_grads.multi_tensor_scale_impl is no_apex._scale
    assert optimizer.multi_tensor_scale_impl is no_apex._scale


class Wrapper:  # megatron-core's optimizer wrappers keep the torch optimizer as .optimizer
    def __init__(self, inner):
        self.optimizer = inner


def test_fused_adam_takes_the_same_steps_as_torchs_default_adam():
    params = [torch.nn.Parameter(t) for t in tensors(4)]
    twins = [torch.nn.Parameter(t.detach().clone()) for t in params]
    fused = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        for p, q, g in zip(params, twins, tensors(10 + step)):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 1:  # after a step (state exists, as after loading a checkpoint)
            no_apex.fuse_adam(Wrapper(fused))
            assert all(g["fused"] and not g["foreach"] for g in fused.param_groups)
        fused.step()
        plain.step()
    assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(params, twins))
    assert not all(torch.equal(p, t) for p, t in zip(params, tensors(4)))  # they did move


def test_wgrad_accumulation_is_only_installed_where_the_device_computes_it_right():
    from megatron.core.tensor_parallel import layers

    before = (layers._grad_accum_fusion_available, getattr(layers, "fused_weight_gradient_mlp_cuda", None))
    # torch has no fp32-output addmm on CPU: the probe says so and megatron-core is left as it was.
    assert no_apex._accumulates_right(torch.device("cpu")) is False
    assert no_apex.install_wgrad_accumulation(torch.device("cpu")) is before[0]
    assert (layers._grad_accum_fusion_available, getattr(layers, "fused_weight_gradient_mlp_cuda", None)) == before


def test_fp16_wgrad_accumulation_adds_the_weight_gradient_in_place():
    g = torch.Generator().manual_seed(5)
    x, dy, acc = torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g), torch.randn(3, 4, generator=g)
    expected = acc + dy.t() @ x
    no_apex._WgradAccumulation.wgrad_gemm_accum_fp16(x, dy, acc)
    assert torch.allclose(acc, expected, atol=1e-6)


def test_the_start_line_names_the_fused_paths():
    from megatron_swift.backend.device import Backend

    assert Backend("cpu", use_te=False).fusions() == ""
    cuda = Backend("cuda", use_te=False, attention="sdpa", wgrad_fusion=True, fused_cross_entropy=True)
    assert cuda.fusions() == ", fused wgrad-accumulation + cross-entropy"
