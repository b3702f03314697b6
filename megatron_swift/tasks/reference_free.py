"""What CPO, SimPO and ORPO share: preference pairs trained on the policy's own log-probabilities alone.

No reference model is built (``reference_copies`` is 0, so the memory planner counts none) and nothing
is computed before the step: one forward/backward of the pair rows (chosen rows, then rejected rows, as
data.preference lays them out), whose per-row log-probabilities come from the model's
vocabulary-parallel cross-entropy and are summed over context-parallel ranks (tasks.reference's
``sequence_logps``). Subclasses write ``pair_losses(chosen, rejected, chosen_mean, rejected_mean)``:
per-pair losses of the preference term and per-pair figures. The loss of a pair adds ``nll_weight`` x
the chosen completion's mean token NLL (the ``nll_loss`` figure), averaged per pair so that the loss does
not depend on how pairs are split into micro-batches and ranks (TRL averages over the micro-batch's
tokens instead; the two agree with one pair per micro-batch).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from megatron_swift.data.preference import preference_source
from megatron_swift.tasks.base import rows_from_jsonl
from megatron_swift.tasks.reference import pair_rows_step, per_item_reports, sequence_logps
from megatron_swift.tasks.reports import reduce_reports


class ReferenceFreeTask:
    rows_per_sample = 2
    forward_passes = 1.0  # the policy's forward+backward only
    head = "lm"
    read_data = staticmethod(preference_source)
    takes_images = True  # rows with images (data.preference): tasks.reference's forward passes them
    nll_key = "alpha"  # the task.* key weighting the chosen completion's NLL

    @staticmethod
    def reference_copies(cfg) -> int:
        """Frozen copies of the policy's weights the run holds: none."""
        return 0

    def __init__(self, task_cfg):
        self.cfg = task_cfg

    @classmethod
    def validate(cls, cfg, problems: List[str]) -> None:
        task = cfg.task
        if getattr(task, "beta", 1.0) <= 0:
            problems.append(f"task.beta={task.beta} must be > 0")
        if not 0 <= getattr(task, "label_smoothing", 0.0) < 0.5:
            problems.append(f"task.label_smoothing={task.label_smoothing} must be in [0, 0.5)")
        if getattr(task, cls.nll_key) < 0:
            problems.append(f"task.{cls.nll_key}={getattr(task, cls.nll_key)} must be >= 0")
        rows_from_jsonl(cfg, problems)

    @classmethod
    def build(cls, cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".", model=None):
        return cls(cfg.task)

    def prepare(self, batches, dataset=None) -> None:
        """Nothing to compute before the forward/backward: there is no reference."""

    def forward_step(self):
        return pair_rows_step(self.loss_func)

    @property
    def nll_weight(self) -> float:
        return 1.0

    def pair_losses(self, chosen, rejected, chosen_mean, rejected_mean) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss_func(self, batch, token_losses: torch.Tensor):
        """Sum of pair losses, number of pairs, and [sum, pairs] reports of every logged figure."""
        logps, counts = sequence_logps(token_losses, batch.loss_mask)
        means = logps / counts.clamp(min=1)
        m = logps.shape[0] // 2
        out = self.pair_losses(logps[:m], logps[m:], means[:m], means[m:])
        nll = -means[:m]
        losses = out.pop("losses")
        if self.nll_weight:
            losses = losses + self.nll_weight * nll
        pairs = torch.tensor(float(m), device=logps.device)
        figures = dict(out, loss=losses.detach(), nll_loss=nll.detach())
        figures["logps/chosen"], figures["logps/rejected"] = logps[:m].detach(), logps[m:].detach()
        return losses.sum(), pairs.to(torch.int), per_item_reports(figures, pairs)

    def metrics(self, reports: List[dict], device) -> Dict[str, float]:
        return reduce_reports(reports, device)
