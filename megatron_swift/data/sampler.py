"""Which samples each rank sees at each step: a pure function of (epoch, step).

One epoch is one pass over a permutation of the ``N`` samples (re-drawn each
epoch from ``seed + epoch``). It holds ``N // global_batch_size`` optimizer
steps; the ``N % global_batch_size`` samples left over at the end of the
permutation are not used in that epoch (a different remainder each epoch when
shuffling). Data parallelism splits each global batch, it never changes how
many steps an epoch has. Because the position follows from the iteration
count alone, a resumed run reads exactly the samples an uninterrupted run
would have read next.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import torch


@dataclass
class Batch:
    """One micro-batch as the model consumes it."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    # Packed rows: which sample each position belongs to (-1: padding); None: one sequence per row.
    segments: Optional[torch.Tensor] = None
    # Preference tasks: the reference model's log-probability of each row (set by the task before the step).
    ref_logps: Optional[torch.Tensor] = None
    # Dataset indices of the micro-batch's samples (map-style datasets), for per-sample lookups.
    sample_ids: Optional[torch.Tensor] = None
    # Real (non-padding) tokens of each row: a reward model scores the last one.
    lengths: Optional[torch.Tensor] = None
    # KTO: whether each example (first half of the rows) is desirable (its row's "label").
    desirable: Optional[torch.Tensor] = None
    # Reward models: the margin by which each pair's chosen should beat its rejected (row "margin", default 0).
    margin: Optional[torch.Tensor] = None
    # GRPO: each row's advantage, and per-token log-probs of the policy at generation time (several steps per
    # generation); ref_logps then holds the reference's per-token log-probs.
    advantages: Optional[torch.Tensor] = None
    old_logps: Optional[torch.Tensor] = None
    # Vision-language rows: the micro-batch's images ([n, 3, H, W], in order of appearance, row by row) and,
    # per position, which row of the flattened image features goes there ([b, s]: k * T + j for the j-th of
    # the T tokens of image k; -1 for text). Made before the CP cut, so each rank places exactly its own.
    images: Optional[torch.Tensor] = None
    image_index: Optional[torch.Tensor] = None
    # A held vision tower's own inputs (models/held_tower.py; e.g. Qwen2.5-VL: "pixel_values" [patches, dim] and
    # "image_grid_thw" [n, 3]), whose features image_index places; None: none (or LLaVA-style ``images``).
    # position_ids is [3, b, s] for an M-RoPE language model (the family's positions; same cut as tokens).
    media: Optional[Dict[str, torch.Tensor]] = None
    # GKD: the teacher's logits of the rows ([b, s, this rank's vocabulary shard]; last pipeline stage).
    teacher_logits: Optional[torch.Tensor] = None

    def to(self, device) -> "Batch":
        return Batch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})


def _to(value, device):
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return None if value is None else value.to(device)


@dataclass
class DataParallelSampler:
    """Micro-batches for one data-parallel rank."""

    num_samples: int
    global_batch_size: int
    micro_batch_size: int
    dp_size: int
    dp_rank: int
    seed: int
    shuffle: bool = True

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def global_batch(self, iteration: int) -> torch.Tensor:
        """Sample indices of the whole global batch at ``iteration`` (0-based)."""
        epoch, step = divmod(iteration, self.steps_per_epoch)
        start = step * self.global_batch_size
        return self._order(epoch)[start : start + self.global_batch_size]

    def microbatch_indices(self, iteration: int) -> List[torch.Tensor]:
        """This rank's micro-batches: micro-batch ``k`` of rank ``r`` is slot ``k * dp + r`` of the global batch."""
        chunks = self.global_batch(iteration).split(self.micro_batch_size)
        return [chunks[k * self.dp_size + self.dp_rank] for k in range(self.num_microbatches)]


def collate(samples: List[torch.Tensor]) -> Batch:
    """Stack windows of ``S + 1`` tokens into inputs and next-token labels."""
    windows = torch.stack(samples)
    tokens, labels = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
    return Batch(tokens, labels, torch.ones_like(labels, dtype=torch.float32), positions)
