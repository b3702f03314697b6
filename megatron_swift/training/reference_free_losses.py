"""Preference losses without a reference model (CPO, SimPO, ORPO), on per-sequence log-probabilities.

Inputs are 1-D tensors with one entry per pair: the policy's log-probability of
the chosen and of the rejected completion, summed over completion tokens (CPO)
or averaged over them (SimPO, ORPO: the caller divides by the token counts).
Each function returns per-pair losses of the preference term and the figures
the trainer logs; the tasks (tasks/cpo.py, simpo.py, orpo.py) add the NLL term.
Forms (as TRL implements them, whose users come here):

- CPO, sigmoid: ``z = beta * (pc - pr)``,
  ``loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)``; the task
  adds ``alpha`` x the chosen completion's mean token NLL.
- SimPO: the same on averaged log-probabilities with the margin
  ``gamma = gamma_beta_ratio * beta`` taken off: ``z = beta * (pc - pr) - gamma``.
- ORPO: ``log_odds = (pc - pr) - (log(1 - exp(pc)) - log(1 - exp(pr)))`` on
  averaged log-probabilities; the term is ``-lambda * log sigmoid(log_odds)``,
  added to the chosen completion's mean token NLL.

Rewards logged are ``beta * pc`` and ``beta * pr`` (ORPO: ``lambda * ...``), detached.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F


def _smoothed(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log sigmoid(z), with a fraction ``label_smoothing`` of the labels taken as flipped."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _rewards(scale: float, chosen: torch.Tensor, rejected: torch.Tensor) -> Dict[str, torch.Tensor]:
    c, r = (scale * chosen).detach(), (scale * rejected).detach()
    return {"rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
            "rewards/accuracies": (c > r).float()}


def cpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> Dict[str, torch.Tensor]:
    """Per-pair CPO preference losses (summed log-probabilities) and rewards."""
    return {"losses": _smoothed(beta * (chosen - rejected), label_smoothing), **_rewards(beta, chosen, rejected)}


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma_beta_ratio: float,
               label_smoothing: float = 0.0) -> Dict[str, torch.Tensor]:
    """Per-pair SimPO losses (token-averaged log-probabilities) and rewards."""
    z = beta * (chosen - rejected - gamma_beta_ratio)
    return {"losses": _smoothed(z, label_smoothing), **_rewards(beta, chosen, rejected)}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012: switch formulas at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, lambda_: float) -> Dict[str, torch.Tensor]:
    """Per-pair ORPO odds-ratio terms ``-lambda * log sigmoid(log_odds)`` (token-averaged log-probabilities),
    the log odds and the ratio log sigmoid(log_odds), and rewards."""
    chosen, rejected = chosen.float(), rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    return {"losses": -lambda_ * ratio, "log_odds_chosen": log_odds.detach(), "log_odds_ratio": ratio.detach(),
            **_rewards(lambda_, chosen, rejected)}
