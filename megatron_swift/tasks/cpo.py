"""CPO on preference pairs, no reference model: -log sigmoid(beta * (logp_c - logp_r)) + alpha x NLL(chosen)."""
from __future__ import annotations

from megatron_swift.tasks.base import register
from megatron_swift.tasks.configs import CPOConfig
from megatron_swift.tasks.reference_free import ReferenceFreeTask
from megatron_swift.training.reference_free_losses import cpo_loss


@register
class CPOTask(ReferenceFreeTask):
    name = "cpo"
    config = CPOConfig

    @property
    def nll_weight(self) -> float:
        return self.cfg.alpha

    def pair_losses(self, chosen, rejected, chosen_mean, rejected_mean):
        # CPO's preference term is on log-probabilities summed over the completion's tokens.
        return cpo_loss(chosen, rejected, self.cfg.beta, self.cfg.label_smoothing)
