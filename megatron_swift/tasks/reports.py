"""Reduce the per-micro-batch reports of megatron-core's schedules into global-batch metrics."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def reduce_reports(reports: List[Dict[str, torch.Tensor]], device) -> Dict[str, float]:
    """Each report maps a name to ``[sum, count]``; returns sum / count over micro-batches, DP ranks and
    CP ranks (each holds part of every row's tokens).

    Valid on the last pipeline stage, where the reports are made."""
    if not reports:
        return {}
    names = sorted(reports[0])
    total = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    for report in reports:
        for i, name in enumerate(names):
            total[i] += report[name].to(total)
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return {name: (total[i, 0] / total[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}


def mtp_losses(num_microbatches: int, device) -> Dict[str, float]:
    """This step's multi-token-prediction losses (models with MTP layers, trained through GPTModel's labels path),
    as megatron-core 0.16.1 records them: per MTP layer, the sum over this rank's micro-batches of each one's mean
    token loss (MTPLossLoggingHelper's tracker). Returned as the mean over micro-batches and DP x CP ranks
    (``mtp_loss``: over the MTP layers too; ``mtp_<i>_loss`` per layer when there are several); the tracker is
    emptied for the next step. Empty without MTP layers or when no training forward ran.

    The tracker's own reduction averages with ReduceOp.AVG, which gloo lacks: summed and divided here instead."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    tracker = MTPLossLoggingHelper.tracker
    if "values" not in tracker or not num_microbatches or not bool(tracker["values"].any()):
        return {}
    values = tracker["values"].detach().to(device=device, dtype=torch.float64)
    group = ps.get_data_parallel_group(with_context_parallel=True)
    dist.all_reduce(values, group=group)
    values /= num_microbatches * dist.get_world_size(group)
    tracker["values"].zero_()
    out = {"mtp_loss": values.mean().item()}
    if values.numel() > 1:
        out.update({f"mtp_{i + 1}_loss": v.item() for i, v in enumerate(values)})
    return out


def moe_aux_loss(tconfig, num_microbatches: int, device) -> Dict[str, float]:
    """This step's MoE load-balancing loss (``model.moe_aux_loss_coeff`` > 0), as megatron-core 0.16.1's router
    records it: per layer, the Switch-Transformer loss E * sum_i f_i * P_i without its coefficient, summed over
    this rank's micro-batches (``get_moe_layer_wise_logging_tracker()['load_balancing_loss']``; the backward gets
    coefficient x loss through MoEAuxLossAutoScaler). Returned as ``moe_aux_loss``: the mean over MoE layers and
    micro-batches, like megatron-core's ``track_moe_metrics``; the tracker is emptied for the next step.

    Every rank calls it (the layers are spread over pipeline stages); the figure is the last stage's to report.
    Reduced here as ``reduce_aux_losses_tracker_across_ranks`` does (sum over PP and over the TP x CP group, whose
    ranks hold parts of each layer's token sum; mean over DP), with sums: gloo has no ReduceOp.AVG."""
    if not (tconfig.num_moe_experts and tconfig.moe_aux_loss_coeff) or not num_microbatches:
        return {}
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    slots = tconfig.num_layers + (tconfig.mtp_num_layers or 0)
    values = (entry["values"].detach().to(device=device, dtype=torch.float64) if entry is not None
              else torch.zeros(slots, dtype=torch.float64, device=device))  # a stage without MoE layers
    dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(values, group=ps.get_tensor_and_context_parallel_group())
    dp = ps.get_data_parallel_group()
    dist.all_reduce(values, group=dp)
    if entry is not None:
        entry["values"].zero_()
    layers = int((values != 0).sum())  # each MoE layer's loss is positive; dense layers leave their slot at 0
    if not layers:
        return {}
    return {"moe_aux_loss": (values.sum() / (layers * num_microbatches * dist.get_world_size(dp))).item()}
