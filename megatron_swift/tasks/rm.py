"""Reward model: a scalar head on the decoder, trained on preference pairs with the pairwise loss.

The model's output layer is a one-output linear (models.reward_head) and the
reward of a row is its value at the row's last real token, which is where
transformers' ``*ForSequenceClassification`` reads it, so the exported model
scores a conversation the same way. Loss per pair: ``-log sigmoid(r_chosen -
r_rejected - margin)`` (the row's ``margin``, default 0), plus
``task.center_rewards_coefficient * (r_chosen + r_rejected) ** 2`` when set
(as TRL, to keep rewards centred on 0).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List

import torch

from megatron_swift.data.preference import preference_source
from megatron_swift.tasks.base import register, rows_from_jsonl
from megatron_swift.tasks.configs import RMConfig
from megatron_swift.tasks.reference import per_item_reports
from megatron_swift.tasks.reports import reduce_reports
from megatron_swift.training import cp_shard
from megatron_swift.training.preference_losses import reward_pair_loss


def _scores(batch, model):
    return model(batch.tokens, batch.position_ids, attention_mask=None)  # [rows, seq, 1]


@register
class RewardTask:
    name = "rm"
    config = RMConfig
    rows_per_sample = 2
    forward_passes = 1.0
    head = "reward"
    read_data = staticmethod(preference_source)
    takes_images = False
    no_images_why = ("a reward model is exported as a transformers *ForSequenceClassification, which has no "
                     "vision-language class")

    def __init__(self, task_cfg):
        self.cfg = task_cfg

    @classmethod
    def validate(cls, cfg, problems: List[str]) -> None:
        if cfg.task.center_rewards_coefficient < 0:
            problems.append(f"task.center_rewards_coefficient={cfg.task.center_rewards_coefficient} must be >= 0")
        rows_from_jsonl(cfg, problems)

    @classmethod
    def build(cls, cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".",
              model=None) -> "RewardTask":
        return cls(cfg.task)

    def prepare(self, batches, dataset=None) -> None:
        """Nothing to compute before the forward/backward."""

    def forward_step(self):
        def step(data_iterator, model):
            batch = next(data_iterator)
            return _scores(batch, model), cp_shard.counted_once(partial(self.loss_func, batch))

        return step

    def loss_func(self, batch, output: torch.Tensor):
        """Sum of pair losses, number of pairs, and [sum, pairs] reports."""
        rewards = cp_shard.at_positions(output[..., 0], batch.lengths - 1).float()  # the last real token
        m = rewards.shape[0] // 2
        chosen, rejected = rewards[:m], rewards[m:]
        out = reward_pair_loss(chosen, rejected, None if batch.margin is None else batch.margin.to(rewards))
        losses = out.pop("losses")
        if self.cfg.center_rewards_coefficient:
            losses = losses + self.cfg.center_rewards_coefficient * (chosen + rejected) ** 2
        pairs = torch.tensor(float(m), device=rewards.device)
        figures = dict(out, loss=losses.detach())
        figures["rewards/margins"] = (chosen - rejected).detach()
        return losses.sum(), pairs.to(torch.int), per_item_reports(figures, pairs)

    def metrics(self, reports: List[dict], device) -> Dict[str, float]:
        return reduce_reports(reports, device)
