"""Workaround for megatron-core 0.16.1's MoE load-balancing loss under sequence (or context) parallelism: its
gradient is scaled by this rank's share of the tokens instead of the tokens of the sequence it is part of.

With ``calculate_per_token_loss`` (this trainer's loss: a token sum divided by the global token count in
finalize_model_grads), ``TopKRouter.attach_and_log_load_balancing_loss`` multiplies the aux loss by the number of
tokens before attaching it to the backward, so that the division leaves coefficient x loss. Under TP with sequence
parallelism (or CP) each rank of the TP x CP group routes a slice of the sequence and holds that slice's part of
the loss (the parts sum to the loss, ``get_tokens_per_expert_and_token_count`` reduces the counts over the group),
while the main loss counts the whole sequence's tokens once; scaling each part by its slice's token count gives
coefficient / (TP x CP) x loss. Measured (tests/multiproc/test_layout_parity.py, Qwen3-MoE, aux coefficient
0.01): at TP=2 + SP the router's gradient norm was 0.56 x the one-rank run's, the grad norm 4.5e-4 relative off.

Here the count is the group's (the slices' counts summed over the TP x CP group), for the per-layer
``load_balancing_loss`` (megatron-core's ``aux_loss`` type, the one this trainer turns on); installed once.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist


def install() -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter.attach_and_log_load_balancing_loss
    if getattr(original, "_group_token_count", False):
        return

    @functools.wraps(original)
    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss, aux_loss_name,
                                           reduce_group, reduce_group_has_dp=False, valid_token_count=None):
        size = dist.get_world_size(reduce_group) if reduce_group is not None else 1
        if aux_loss_name == "load_balancing_loss" and size > 1 and self.calculate_per_token_loss:
            count = activation.shape[0] if valid_token_count is None else valid_token_count
            if torch.is_tensor(count):  # with a padding mask: each slice's own count of real tokens
                count = count.detach().clone()
                dist.all_reduce(count, group=reduce_group)
            else:  # equal slices
                count = count * size
            valid_token_count = count
        return original(self, activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
                        reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    attach_and_log_load_balancing_loss._group_token_count = True
    TopKRouter.attach_and_log_load_balancing_loss = attach_and_log_load_balancing_loss
