"""Forwards without autograd bookkeeping where megatron-core 0.16 records a graph nobody will use.

megatron-core 0.16.1 routes every tensor-parallel linear, every tensor-parallel region mapping and every
``make_viewless_tensor`` of a layer's output through a ``torch.autograd.Function``: ``.apply`` costs the
same whether or not a graph is recorded. Under ``torch.no_grad()`` (rollouts, log-probs of the reference and
old policy, evaluation, the forward of a recomputed layer) nothing is recorded, and each of those calls is
only its forward arithmetic plus Python overhead. Decoding one token for 16 prompts on a 17M-parameter
Qwen3 on CPU makes ~70 of them per step; calling their forward arithmetic directly took a step from
12.1 to 10.6 ms (``tools/bench/rollout.py``).

:func:`apply` wraps those entry points, where megatron-core's modules look them up, with a dispatcher:
grad mode on -> megatron-core's own function, untouched; grad mode off -> the same arithmetic in the same
order (``torch.matmul(input, weight.t())`` then ``+ bias``; the same reduce and gather helpers; the
graph-free branch of ``make_viewless_tensor``), so results are bitwise equal to the Function's forward.
Sequence-parallel linears (an all-gather into megatron-core's global buffer) always take megatron-core's
path. Applied once by ``backend.device.init`` on every device.

Skinny products on CPU (:func:`generation`). A decode step multiplies each weight by as many rows as there
are prompts. For 16 to 48 rows, MKL's sgemm (torch 2.13's CPU build) computes ``x @ W.t()`` 1.2-2x slower
than the same product written ``(W @ x.t()).t()`` (measured on every linear shape of the bench model; the
plain form is faster from 64 rows on, and for fewer than 16). Inside :func:`generation`, and only where the
backend asked for it (CPU), such products take the second form. The two forms round differently in general
(bitwise equal for the bench model's 512-wide shapes, up to ~1e-4 apart at 896 or 2048 wide), so on CPU a
greedy completion at a near-tie may depend on how many rows its batch has, as it may under another batch
size or TP split; a given run (and its resume) always forms the same batches. Generation only: the
log-probabilities that training compares keep megatron-core's form.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_APPLIED = False
SKINNY_ROWS = (16, 48)  # rows of x for which (W @ x.t()).t() beats x @ W.t() under MKL (see above)
_skinny = {"enabled": False, "active": False}  # asked for by the backend; inside generation()


def _matmul(input, weight, bias=None, *args, **kwargs):
    """The forward of ``LinearWithGradAccumulationAndAsyncCommunication`` / ``LinearWithFrozenWeight`` without
    sequence parallelism."""
    rows = input.numel() // input.shape[-1]
    if _skinny["active"] and SKINNY_ROWS[0] <= rows <= SKINNY_ROWS[1]:
        flat = torch.mm(weight, input.reshape(rows, input.shape[-1]).t()).t().contiguous()
        output = flat.view(*input.shape[:-1], weight.shape[0])
    else:
        output = torch.matmul(input, weight.t())
    if bias is not None:
        output = output + bias
    return output


@contextlib.contextmanager
def generation():
    """Token generation: skinny products in their faster form where the backend enabled it (CPU)."""
    previous = _skinny["active"]
    _skinny["active"] = _skinny["enabled"]
    try:
        yield
    finally:
        _skinny["active"] = previous


def _sequence_parallel(args, kwargs) -> bool:
    # Both linear entry points take sequence_parallel as their sixth argument; megatron-core passes keywords.
    return bool(kwargs.get("sequence_parallel", args[5] if len(args) > 5 else False))


def _dispatch(original, shortcut, eligible=lambda args, kwargs: True):
    @functools.wraps(original)
    def call(*args, **kwargs):
        if torch.is_grad_enabled() or not eligible(args, kwargs):
            return original(*args, **kwargs)
        return shortcut(*args, **kwargs)

    call.megatron_original = original
    return call


def _region(forward):
    """A mapping's forward helper, called with the group megatron-core's wrapper would resolve."""
    from megatron.core.utils import get_tensor_model_parallel_group_if_none

    def call(input_, group=None, *args, **kwargs):
        return forward(input_, get_tensor_model_parallel_group_if_none(group))

    return call


def _viewless(original):
    def call(inp, requires_grad, keep_graph):
        # megatron-core's own branch without the Function; no grad, as the Function's output has none here.
        return original(inp, False, False)

    return call


def _frozen_eligible(args, kwargs) -> bool:
    # linear_with_frozen_weight refuses these two (an assertion); megatron-core's path keeps refusing them.
    return (not _sequence_parallel(args, kwargs) and kwargs.get("grad_output_buffer") is None
            and kwargs.get("wgrad_deferral_limit") is None)


def apply(skinny_products: bool = False) -> None:
    """Install the dispatchers (idempotent); ``skinny_products``: the backend's choice for :func:`generation`."""
    global _APPLIED
    _skinny["enabled"] = skinny_products
    if _APPLIED:
        return
    from megatron.core import utils
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.transformer import transformer_block, transformer_layer

    not_sp = lambda args, kwargs: not _sequence_parallel(args, kwargs)  # noqa: E731
    for name, eligible in (("linear_with_grad_accumulation_and_async_allreduce", not_sp),
                           ("linear_with_frozen_weight", _frozen_eligible)):
        setattr(layers, name, _dispatch(getattr(layers, name), _matmul, eligible))
    # The region mappings' forwards: copy is the identity, reduce all-reduces, gather concatenates the
    # last dimension (the vocabulary-parallel logits).
    shortcuts = {"copy_to_tensor_model_parallel_region": lambda input_, group=None: input_,
                 "reduce_from_tensor_model_parallel_region": _region(mappings._reduce),
                 "gather_from_tensor_model_parallel_region": _region(mappings._gather_along_last_dim)}
    for name, shortcut in shortcuts.items():
        setattr(layers, name, _dispatch(getattr(layers, name), shortcut))
    for module in (transformer_block, transformer_layer):
        module.make_viewless_tensor = _dispatch(module.make_viewless_tensor, _viewless(utils.make_viewless_tensor))
    _APPLIED = True
