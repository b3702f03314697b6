"""Norm placements megatron-core 0.16.1's layer specs cannot express, for OLMo 2 (families/olmo2.py).

This is the one place that works around megatron-core here (0.16.1):

* ``TransformerLayerSubmodules`` has norms only before attention and before the MLP (``input_layernorm``,
  ``pre_mlp_layernorm``); there is no slot for a norm on the attention's or the MLP's output before the residual
  add (OLMo 2's post-norm placement; Gemma's sandwich norms). :class:`PostNormTransformerLayer` is a
  TransformerLayer with two more norm modules, ``post_self_attn_layernorm`` and ``post_mlp_layernorm``, applied
  inside its bias-dropout-add (the output of the row-parallel projection is whole per token there, also under
  sequence parallelism, so a plain norm is exact; its weight carries the SP tag through the spec's norm class).
* ``qk_layernorm`` normalises each head (``hidden_size`` = head_dim); OLMo 2 normalises a token's whole query (and
  key) projection, all heads together. :class:`WholeProjectionRMSNorm` takes the q/k norm slot: each TP rank holds
  ``heads / tp`` heads, so the sum of squares is all-reduced over the TP group, forward and backward
  (:class:`_SumOverTP`: every rank's output depends on every rank's input; megatron-core's TP reductions have an
  identity backward), and its
  weight is split over TP like the heads (a tensor-parallel parameter, sharded along dim 0 in checkpoints).
* megatron-core's ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``) sums over TP the
  gradient of every parameter whose name holds ``q_layernorm`` / ``k_layernorm`` when ``config.qk_layernorm`` is
  set: right for its per-head norm, whose one weight every rank's heads share; wrong for this TP-split weight, where
  it gave every rank the sum of both ranks' halves. Measured (olmo2 tiny, TP=2 with or without SP against one
  rank, step 1): the q/k norm weights' gradients off by their own size, the grad norm by 3.5e-6 relative, 5e-5 at
  step 3. :func:`_keep_split_norm_grads` keeps these weights' gradients out of that sum (installed once); with
  it every parameter's gradient is within 1e-6 relative (2e-9 absolute) of one rank's.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@dataclasses.dataclass
class PostNormLayerSubmodules(TransformerLayerSubmodules):
    """A layer's submodules plus the norms of the attention's and the MLP's outputs."""

    post_self_attn_layernorm: object = IdentityOp
    post_mlp_layernorm: object = IdentityOp


class PostNormTransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer whose attention and MLP outputs are normalised before the residual add:
    x + post_self_attn_layernorm(attention(input_layernorm(x))), likewise for the MLP."""

    def __init__(self, config, submodules: PostNormLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        norm = dict(config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
        self.post_self_attn_layernorm = build_module(submodules.post_self_attn_layernorm, **norm)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm)
        # TransformerLayer calls self.self_attn_bda(training, fused)(output_with_bias, residual, dropout) (and
        # mlp_bda alike, dense and MoE paths): the built functions are kept and called after the norm.
        self._attn_bda, self._mlp_bda = self.self_attn_bda, self.mlp_bda
        self.self_attn_bda, self.mlp_bda = self._normed_attn_bda, self._normed_mlp_bda

    def _normed_attn_bda(self, training: bool, fused: bool):
        return _after_norm(self._attn_bda(training, fused), self.post_self_attn_layernorm)

    def _normed_mlp_bda(self, training: bool, fused: bool):
        return _after_norm(self._mlp_bda(training, fused), self.post_mlp_layernorm)


def _after_norm(bda, norm):
    def apply(output_with_bias, residual, prob):
        output, bias = output_with_bias
        if bias is not None:  # add_bias_linear: the bias belongs before the norm
            output, bias = output + bias, None
        return bda((norm(output), None), residual, prob)

    return apply


class WholeProjectionRMSNorm(torch.nn.Module):
    """RMSNorm over all ``heads`` heads of a token's query or key projection ([s, b, heads / tp, d] on a rank), as
    transformers' Olmo2RMSNorm over q_proj's output: float32 statistics, weight times the normalised values."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, heads: int = 1):
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        self.tp = config.tensor_model_parallel_size
        self.eps, self.width = eps, heads * hidden_size
        self.weight = torch.nn.Parameter(torch.ones(heads // self.tp * hidden_size, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        self.weight.split_qk_norm = True  # its gradient stays out of megatron-core's q/k-norm sum over TP
        if self.tp > 1:
            _keep_split_norm_grads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        squares = wide.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp > 1:
            squares = _SumOverTP.apply(squares)
        normed = wide * torch.rsqrt(squares / self.width + self.eps)
        return (self.weight.view(x.shape[-2:]) * normed).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """The weight as a TP-sharded tensor (dim 0) in distributed checkpoints."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets)


def _keep_split_norm_grads() -> None:
    """Wrap megatron-core 0.16.1's ``_allreduce_non_tensor_model_parallel_grads`` (once): the gradients of weights
    tagged ``split_qk_norm`` (already DP-reduced by then) come out of it as they went in."""
    finalize = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    original = finalize._allreduce_non_tensor_model_parallel_grads
    if getattr(original, "_keeps_split_qk_norm", False):
        return

    @functools.wraps(original)
    def allreduce(model, *args, **kwargs):
        kept = [(grad, grad.clone()) for chunk in model for p in chunk.parameters()
                if getattr(p, "split_qk_norm", False) and (grad := getattr(p, "main_grad", None)) is not None]
        original(model, *args, **kwargs)
        for grad, before in kept:  # megatron-core copies the reduced values into the same buffers
            grad.copy_(before)

    allreduce._keeps_split_qk_norm = True
    finalize._allreduce_non_tensor_model_parallel_grads = allreduce


class _SumOverTP(torch.autograd.Function):
    """Sum over the TP group; the gradient of each rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        torch.distributed.all_reduce(x, group=ps.get_tensor_model_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        return grad


def _layers(block_spec):
    seen = set()
    for layer in getattr(block_spec, "layer_specs", [block_spec]):
        if id(layer) not in seen:
            seen.add(id(layer))
            yield layer


def post_norm_layers(block_spec, use_te: bool) -> None:
    """Every layer of ``block_spec`` a PostNormTransformerLayer without norms before attention and MLP, in place;
    its post norms are the spec's own norm class."""
    if use_te:  # TE fuses the pre-norms into the QKV and fc1 linears: separate them first
        from megatron_swift.models.norm import unfuse_layernorm_linears

        unfuse_layernorm_linears(block_spec)
    for layer in _layers(block_spec):
        sub = layer.submodules
        if isinstance(sub, PostNormLayerSubmodules):
            continue
        norm = sub.input_layernorm
        fields = {f.name: getattr(sub, f.name) for f in dataclasses.fields(TransformerLayerSubmodules)}
        fields.update(input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp, sharded_state_dict_keys_map={})
        layer.module = PostNormTransformerLayer
        layer.submodules = PostNormLayerSubmodules(**fields, post_self_attn_layernorm=norm, post_mlp_layernorm=norm)


def whole_projection_qk_norm(block_spec, num_attention_heads: int, num_query_groups: int) -> None:
    """The q/k norm slots of every layer's attention (qk_layernorm=True) normalise whole projections, in place."""
    for layer in _layers(block_spec):
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = ModuleSpec(module=WholeProjectionRMSNorm, params=dict(heads=num_attention_heads))
        attention.k_layernorm = ModuleSpec(module=WholeProjectionRMSNorm, params=dict(heads=num_query_groups))
