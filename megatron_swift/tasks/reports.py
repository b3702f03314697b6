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
