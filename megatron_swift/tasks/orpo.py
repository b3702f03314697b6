"""ORPO on preference pairs, no reference model: NLL(chosen) - lambda x log sigmoid(log odds ratio)."""
from __future__ import annotations

from megatron_swift.tasks.base import register
from megatron_swift.tasks.configs import ORPOConfig
from megatron_swift.tasks.reference_free import ReferenceFreeTask
from megatron_swift.training.reference_free_losses import orpo_loss


@register
class ORPOTask(ReferenceFreeTask):
    name = "orpo"
    config = ORPOConfig
    nll_key = "lambda_"  # validated >= 0; the NLL itself always has weight 1

    def pair_losses(self, chosen, rejected, chosen_mean, rejected_mean):
        # The odds of a completion are those of its mean token probability (the ORPO paper's P(y|x)).
        return orpo_loss(chosen_mean, rejected_mean, self.cfg.lambda_)
