"""The pretraining forward step handed to megatron-core's pipeline schedules.

The loss contract is megatron-core's per-token one: ``loss_func`` returns the
*sum* of token losses, the token count and a report; with
``calculate_per_token_loss`` the schedule does not divide by the number of
micro-batches and ``finalize_model_grads`` divides gradients by the token
count of the whole global batch (all micro-batches, all DP ranks). The loss
is therefore the mean over every loss-carrying token of the global batch,
whatever the layout.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron_swift.models.attention import attention_inputs
from megatron_swift.models.vlm import image_inputs


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of masked token losses, token count, and ``[sum, count]`` for reporting."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output_tensor.float().reshape(-1) * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def make_forward_step(packed_format: str):
    """The forward step for megatron-core's schedules; ``packed_format`` is the backend's (see Backend)."""

    def forward_step(data_iterator, model):
        """Run one micro-batch; GPTModel returns per-token losses when given labels. The loss mask reaches the
        model for its multi-token-prediction layers (megatron-core rolls it with the labels, and adds their loss
        to the backward itself: MTPLossAutoScaler); without MTP layers GPTModel does not read it."""
        batch = next(data_iterator)
        output = model(batch.tokens, batch.position_ids, labels=batch.labels, loss_mask=batch.loss_mask,
                       **attention_inputs(batch.segments, packed_format), **image_inputs(batch))
        return output, partial(loss_func, batch.loss_mask)

    return forward_step
