"""DPO / IPO (and RPO through task.sft_weight) on preference pairs: rows (chosen, rejected) per pair."""
from __future__ import annotations

from typing import List

import torch

from megatron_swift.tasks.base import register
from megatron_swift.tasks.configs import DPOConfig
from megatron_swift.tasks.reference import ReferenceTask, per_item_reports, sequence_logps
from megatron_swift.training.preference_losses import dpo_loss


@register
class DPOTask(ReferenceTask):
    name = "dpo"
    config = DPOConfig

    @classmethod
    def validate(cls, cfg, problems: List[str]) -> None:
        task = cfg.task
        if task.loss_type not in ("sigmoid", "ipo"):
            problems.append(f"task.loss_type={task.loss_type} is not one of: sigmoid, ipo")
        if not 0 <= task.label_smoothing < 0.5:
            problems.append(f"task.label_smoothing={task.label_smoothing} must be in [0, 0.5)")
        super().validate(cfg, problems)

    def loss_func(self, batch, token_losses: torch.Tensor):
        """Sum of pair losses, number of pairs, and [sum, pairs] reports of every logged figure."""
        logps, counts = sequence_logps(token_losses, batch.loss_mask)
        ref = batch.ref_logps
        m = logps.shape[0] // 2
        policy, reference = (logps / counts, ref / counts) if self.cfg.loss_type == "ipo" else (logps, ref)
        out = dpo_loss(policy[:m], policy[m:], reference[:m], reference[m:], self.cfg.beta,
                       self.cfg.label_smoothing, self.cfg.loss_type)
        losses = out.pop("losses")
        if self.cfg.sft_weight:
            losses = losses + self.cfg.sft_weight * (-logps[:m] / counts[:m].clamp(min=1))
        pairs = torch.tensor(float(m), device=logps.device)
        figures = dict(out, loss=losses.detach())
        figures["logps/chosen"], figures["logps/rejected"] = logps[:m].detach(), logps[m:].detach()
        return losses.sum(), pairs.to(torch.int), per_item_reports(figures, pairs)
