"""backend.no_grad_paths: under torch.no_grad the shortcuts compute exactly what megatron-core's autograd
Functions compute (bitwise), with grad mode on megatron-core's own functions run, and the skinny products of
generation() equal the plain product."""
from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel import layers
from megatron.core.transformer import TransformerConfig

from megatron_swift.backend import no_grad_paths

pytestmark = pytest.mark.usefixtures("world_of_one")


@pytest.fixture(scope="module", autouse=True)
def applied():
    no_grad_paths.apply(skinny_products=True)


def _linears():
    config = TransformerConfig(num_layers=1, hidden_size=24, num_attention_heads=2, use_cpu_initialization=True,
                               perform_initialization=True)
    init = torch.nn.init.normal_
    column = layers.ColumnParallelLinear(24, 40, config=config, init_method=init, bias=True, gather_output=True)
    row = layers.RowParallelLinear(40, 24, config=config, init_method=init, bias=True, input_is_parallel=True,
                                   skip_bias_add=False)
    with torch.no_grad():  # megatron-core starts biases at zero: give them values that show
        column.bias.normal_()
        row.bias.normal_()
    return column, row


def _forward(column, row, x):
    hidden, _ = column(x)
    out, _ = row(torch.nn.functional.silu(hidden))
    return out


@pytest.mark.parametrize("frozen", [False, True])  # LinearWithFrozenWeight for a frozen column weight (LoRA's base)
@pytest.mark.parametrize("rows", [3, 20, 200])  # few, skinny (16..48) and many rows of the product
def test_no_grad_forward_equals_the_autograd_functions_bitwise(rows, frozen):
    torch.manual_seed(0)
    column, row = _linears()
    column.weight.requires_grad_(not frozen)
    x = torch.randn(rows, 1, 24)
    with_graph = _forward(column, row, x)
    assert with_graph.requires_grad  # megatron-core's Functions ran and recorded their graph
    with torch.no_grad():
        without = _forward(column, row, x)
    assert not without.requires_grad
    assert torch.equal(with_graph.detach(), without)


def test_grad_mode_runs_megatron_cores_functions_and_their_backward():
    torch.manual_seed(0)
    column, row = _linears()
    x = torch.randn(5, 2, 24, requires_grad=True)
    _forward(column, row, x).pow(2).sum().backward()
    reference = [p.grad.clone() for p in (column.weight, row.weight)] + [x.grad.clone()]
    # The same computation through plain torch ops: the gradients megatron-core's backward must give.
    xr = x.detach().clone().requires_grad_(True)
    w1, b1 = column.weight.detach().clone().requires_grad_(True), column.bias.detach()
    w2, b2 = row.weight.detach().clone().requires_grad_(True), row.bias.detach()
    out = torch.nn.functional.silu(xr @ w1.t() + b1) @ w2.t() + b2
    out.pow(2).sum().backward()
    for ours, plain in zip(reference, [w1.grad, w2.grad, xr.grad]):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    assert layers.linear_with_grad_accumulation_and_async_allreduce.megatron_original.__module__ == layers.__name__


def test_generation_uses_skinny_products_only_where_enabled_and_only_inside():
    torch.manual_seed(0)
    column, row = _linears()
    x = torch.randn(20, 1, 24)  # 20 rows: a skinny product
    with torch.no_grad():
        plain = _forward(column, row, x)
        calls = []
        original_mm = torch.mm
        torch.mm = lambda *a, **k: calls.append(1) or original_mm(*a, **k)
        try:
            _forward(column, row, x)
            assert calls == []  # outside generation(): megatron-core's form
            with no_grad_paths.generation():
                skinny = _forward(column, row, x)
            assert len(calls) == 2  # both linears, as (W @ x.t()).t()
            no_grad_paths.apply(skinny_products=False)  # what the backend asks for on GPUs
            with no_grad_paths.generation():
                _forward(column, row, x)
            assert len(calls) == 2
        finally:
            torch.mm = original_mm
            no_grad_paths.apply(skinny_products=True)
    assert skinny.is_contiguous()
    torch.testing.assert_close(skinny, plain, rtol=1e-6, atol=1e-6)


def test_make_viewless_tensor_without_grad_keeps_the_values_and_drops_the_base():
    from megatron.core.transformer import transformer_layer

    base = torch.randn(4, 6)
    view = base[:, :3]
    with torch.no_grad():
        out = transformer_layer.make_viewless_tensor(view, requires_grad=True, keep_graph=True)
    assert out._base is None and torch.equal(out, view)
    assert not out.requires_grad  # as megatron-core's Function gives under no_grad


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [16, 8])  # every feature, or the first half (partial rotary)
def test_rollout_key_rotation_equals_megatron_cores_rope(interleaved, rotary_dim):
    # rollout.rotated_cache.rotate stands in for flash-attn's kernel while generating; the training forward
    # uses megatron-core's own rotary embedding: both must rotate the same way.
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_swift.rollout.rotated_cache import rotate

    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 16)  # [b, s, heads, d]
    angles = torch.randn(5, rotary_dim // 2)
    ours = rotate(x, angles.cos(), angles.sin(), interleaved)
    freqs = angles.repeat_interleave(2, -1) if interleaved else torch.cat([angles, angles], -1)
    theirs = _apply_rotary_pos_emb_bshd(x.transpose(0, 1), freqs[:, None, None, :], rotary_interleaved=interleaved)
    torch.testing.assert_close(ours, theirs.transpose(0, 1), rtol=0, atol=1e-6)
    if rotary_dim < 16:
        assert torch.equal(ours[..., rotary_dim:], x[..., rotary_dim:])
