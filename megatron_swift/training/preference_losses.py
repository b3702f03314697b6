"""Preference losses on per-sequence log-probabilities (summed over completion tokens).

Each function takes 1-D tensors with one entry per pair (DPO/IPO/RM) or per
example (KTO) and returns per-entry losses plus the reward figures the
trainer logs. Forms implemented (as in TRL, whose users come here):

- DPO ``sigmoid`` with label smoothing ``eps`` (the "conservative DPO" /
  robust form): with ``z = beta * ((pc - pr) - (rc - rr))``,
  ``loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)``.
- IPO: ``loss = ((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2`` on
  log-probabilities averaged over completion tokens (the IPO paper's form);
  the caller passes averaged values.
- KTO: ``r = p - ref``; desirable ``w_d * (1 - sigmoid(beta * (r - kl)))``,
  undesirable ``w_u * (1 - sigmoid(beta * (kl - r)))``, where ``kl`` is a
  detached, non-negative batch estimate of KL(policy || reference)
  (``kto_kl_estimate``).
- Reward model, pairwise: ``loss = -log sigmoid(sc - sr - margin)``.

Rewards logged for DPO/IPO/KTO are ``beta * (p - ref)``, detached.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> Dict[str, torch.Tensor]:
    """Per-pair DPO (``sigmoid``) or IPO (``ipo``) losses and the chosen/rejected rewards."""
    margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        z = beta * margin
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type '{loss_type}' (sigmoid or ipo)")
    return {"losses": losses, **_rewards(beta, policy_chosen, ref_chosen, policy_rejected, ref_rejected)}


def _rewards(beta, policy_chosen, ref_chosen, policy_rejected, ref_rejected) -> Dict[str, torch.Tensor]:
    chosen = (beta * (policy_chosen - ref_chosen)).detach()
    rejected = (beta * (policy_rejected - ref_rejected)).detach()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float()}


def kto_kl_estimate(policy: torch.Tensor, ref: torch.Tensor, group=None) -> torch.Tensor:
    """Batch estimate of KL(policy || reference): the mean log-ratio over the rows (and over the ranks of
    ``group``, the data-parallel group, as TRL gathers it over processes), clamped at 0 and detached."""
    ratio = (policy - ref).detach().float()
    total = torch.stack([ratio.sum(), torch.tensor(float(ratio.numel()), device=ratio.device)])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return (total[0] / total[1]).clamp(min=0)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """Per-example KTO losses; ``desirable`` is a bool tensor (the row's ``label``)."""
    ratio = policy - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    losses = torch.where(desirable, good, bad)
    rewards = (beta * ratio).detach()
    return {"losses": losses, "rewards": rewards, "kl": kl}


def reward_pair_loss(score_chosen: torch.Tensor, score_rejected: torch.Tensor,
                     margin: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Pairwise reward-model loss (Bradley-Terry), with an optional per-pair margin."""
    diff = score_chosen - score_rejected - (margin if margin is not None else 0.0)
    return {"losses": -F.logsigmoid(diff), "rewards/chosen": score_chosen.detach(),
            "rewards/rejected": score_rejected.detach(),
            "rewards/accuracies": (score_chosen > score_rejected).float().detach()}
