"""KTO on single completions labelled desirable or not: rows (example, KL row) per item.

The KL row pairs the example's prompt with another example's completion
(data.preference); the mean policy/reference log-ratio over the micro-batch's
KL rows, gathered over data-parallel ranks, is the detached baseline ``kl``
of the KTO loss (training.preference_losses.kto_loss).
"""
from __future__ import annotations

from typing import Dict, List

import torch
from megatron.core import parallel_state as ps

from megatron_swift.data.preference import kto_source
from megatron_swift.tasks.base import register
from megatron_swift.tasks.configs import KTOConfig
from megatron_swift.tasks.reference import ReferenceTask, sequence_logps
from megatron_swift.tasks.reports import reduce_reports
from megatron_swift.training.preference_losses import kto_kl_estimate, kto_loss


def _masked(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[sum over the masked entries, how many]."""
    return torch.stack([(value * mask).sum(), mask.sum()])


@register
class KTOTask(ReferenceTask):
    name = "kto"
    config = KTOConfig
    read_data = staticmethod(kto_source)

    @classmethod
    def validate(cls, cfg, problems: List[str]) -> None:
        task = cfg.task
        if min(task.desirable_weight, task.undesirable_weight) <= 0:
            problems.append(f"task.desirable_weight={task.desirable_weight} and task.undesirable_weight="
                            f"{task.undesirable_weight} must both be > 0")
        super().validate(cfg, problems)

    def loss_func(self, batch, token_losses: torch.Tensor):
        """Sum of example losses, number of examples, and reports split by label."""
        logps, _ = sequence_logps(token_losses, batch.loss_mask)
        ref = batch.ref_logps
        m = logps.shape[0] // 2
        kl = kto_kl_estimate(logps[m:], ref[m:], group=ps.get_data_parallel_group())
        desirable = batch.desirable.to(device=logps.device, dtype=torch.bool)
        out = kto_loss(logps[:m], ref[:m], desirable, kl, self.cfg.beta, self.cfg.desirable_weight,
                       self.cfg.undesirable_weight)
        losses, rewards = out["losses"], out["rewards"]
        examples = torch.tensor(float(m), device=logps.device)
        good, bad = desirable.float(), (~desirable).float()
        policy = logps[:m].detach()
        report = {
            "loss": torch.stack([losses.detach().sum(), examples]),
            "kl": torch.stack([kl, torch.ones_like(kl)]),
            "rewards/chosen": _masked(rewards, good), "rewards/rejected": _masked(rewards, bad),
            "logps/chosen": _masked(policy, good), "logps/rejected": _masked(policy, bad),
        }
        return losses.sum(), examples.to(torch.int), report

    def metrics(self, reports: List[dict], device) -> Dict[str, float]:
        out = reduce_reports(reports, device)
        if out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
