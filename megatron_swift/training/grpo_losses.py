"""GRPO's arithmetic, as pure functions of tensors (closed-form tests: tests/test_grpo_losses.py).

- ``advantages``: rewards of each prompt's group of completions, centred on the group mean and scaled
  (by the group's std, the whole batch's std, or not at all).
- ``token_terms``: per completion token, the clipped surrogate ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``
  with ``r = exp(logp - old_logp)``, plus ``beta`` times the k3 estimate of KL(policy || reference),
  ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, always >= 0).
- ``aggregate``: the loss of a micro-batch as megatron-core's per-token contract wants it, ``(sum, count)``:
  the schedule sums both over micro-batches and data-parallel ranks and divides, so each loss type's
  normaliser is the count it returns.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """[N] rewards, consecutive groups of ``group_size`` per prompt -> [N] advantages.

    The std is torch's default (unbiased, n-1), as TRL's GRPO uses it."""
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards={scale} is not one of {SCALE_REWARDS}")
    return centred.reshape(-1)


def zero_spread_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N / group_size] bool: groups whose completions all got the same reward (no learning signal)."""
    grouped = rewards.float().view(-1, group_size)
    return (grouped.max(dim=1).values - grouped.min(dim=1).values) == 0


def token_terms(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps, advantages: torch.Tensor,
                eps_low: float, eps_high: float, beta: float, mask=None) -> Dict[str, torch.Tensor]:
    """Per-token loss and its parts; every tensor [rows, tokens] except ``advantages`` [rows].

    ``ref_logps`` may be None when beta == 0 (no reference model). ``mask`` (the completion tokens): other
    positions are computed as if policy, old and reference agreed there (ratio 1, KL 0), so that a large
    log-probability gap on a prompt or padding token cannot overflow ``exp`` into inf * 0 = NaN."""
    if mask is not None:
        keep = mask.bool()
        old_logps = torch.where(keep, old_logps, logps.detach())
        if ref_logps is not None:
            ref_logps = torch.where(keep, ref_logps, logps.detach())
    adv = advantages.unsqueeze(-1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    out = {"ratio": ratio,
           # Where clipping took the gradient away: below the range with A < 0, above it with A > 0.
           "clipped_low": ((ratio < 1 - eps_low) & (adv < 0)).float(),
           "clipped_high": ((ratio > 1 + eps_high) & (adv > 0)).float()}
    if beta != 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
        out["kl"] = kl
    out["loss"] = loss
    return out


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, count) of a micro-batch; the loss of the step is sum over the global batch / count over it.

    - grpo: each completion's token mean, averaged over completions (count: completions);
    - bnpo: the token mean of each micro-batch, averaged over micro-batches (count: 1 per micro-batch);
    - dr_grpo: token sum / max_completion_length, averaged over completions (no length bias);
    - dapo: the token mean over the whole global batch (count: completion tokens)."""
    mask = mask.float()
    per_row = (token_loss * mask).sum(-1)
    tokens = mask.sum(-1)
    rows = torch.tensor(float(token_loss.shape[0]), device=token_loss.device)
    if loss_type == "grpo":
        return (per_row / tokens.clamp(min=1)).sum(), rows
    if loss_type == "bnpo":
        return per_row.sum() / tokens.sum().clamp(min=1), torch.ones_like(rows)
    if loss_type == "dr_grpo":
        return per_row.sum() / max_completion_length, rows
    if loss_type == "dapo":
        return per_row.sum(), tokens.sum()
    raise ValueError(f"loss_type={loss_type} is not one of {LOSS_TYPES}")
