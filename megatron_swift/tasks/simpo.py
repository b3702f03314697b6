"""SimPO on preference pairs, no reference model: length-normalised log-probabilities with a target margin."""
from __future__ import annotations

from megatron_swift.tasks.base import register
from megatron_swift.tasks.configs import SimPOConfig
from megatron_swift.tasks.reference_free import ReferenceFreeTask
from megatron_swift.training.reference_free_losses import simpo_loss


@register
class SimPOTask(ReferenceFreeTask):
    name = "simpo"
    config = SimPOConfig

    @property
    def nll_weight(self) -> float:
        return self.cfg.alpha

    def pair_losses(self, chosen, rejected, chosen_mean, rejected_mean):
        return simpo_loss(chosen_mean, rejected_mean, self.cfg.beta, self.cfg.gamma_beta_ratio,
                          self.cfg.label_smoothing)
