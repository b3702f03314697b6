"""GKD's generalised Jensen-Shannon divergence between student and teacher token distributions, computed on
vocabulary shards (tensor parallelism splits the output layer by vocabulary, as for the cross-entropy), so no
rank ever holds a full-vocabulary row.

With ``s = log softmax(student / T)``, ``t = log softmax(teacher / T)`` per position:

- beta 0: forward KL, ``KL(teacher || student) = sum p_t (t - s)``;
- beta 1: reverse KL, ``KL(student || teacher) = sum p_s (s - t)``;
- otherwise, with the mixture ``m = (1 - beta) p_s + beta p_t``:
  ``beta KL(teacher || m) + (1 - beta) KL(student || m)``

(Agarwal et al. 2024, eq. 1; the end points as TRL's GKDTrainer.generalized_jsd_loss takes them). Each
shard's terms are elementwise; the two sums over the vocabulary (the softmax's normaliser and the
divergence) are all-reduced over the tensor-parallel group. Padding columns of the padded vocabulary
(-inf logits, models/vocab_mask.py) carry no probability and add nothing.

megatron-core 0.16 has a vocabulary-parallel cross-entropy but no vocabulary-parallel log-softmax; the
small autograd function below is that, with its gradient written out (the normaliser couples every shard).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

# Stands for -inf (padding columns) so that 0 * (a - b) stays 0 instead of nan; exp of it is exactly 0.
_NEG = -1e30


def _all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """log softmax over a vocabulary split across ``group`` (the last dimension is this rank's shard)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, group):
        top = _all_reduce(logits.max(dim=-1, keepdim=True).values, group, dist.ReduceOp.MAX)
        shifted = logits - top
        norm = _all_reduce(shifted.exp().sum(dim=-1, keepdim=True), group)
        out = shifted - norm.log()
        ctx.save_for_backward(out)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        total = _all_reduce(grad.sum(dim=-1, keepdim=True), ctx.group)  # over the whole vocabulary
        return grad - out.exp() * total, None


class _SumOverShards(torch.autograd.Function):
    """Sum of the shards' parts (all-reduce); each part's gradient is the total's (identity backward)."""

    @staticmethod
    def forward(ctx, part: torch.Tensor, group):
        return _all_reduce(part.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def log_softmax(logits: torch.Tensor, temperature: float = 1.0, group=None) -> torch.Tensor:
    """Log-probabilities (fp32 at least) of this rank's vocabulary shard at ``temperature`` (padding: -1e30)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    return _VocabParallelLogSoftmax.apply(x.masked_fill(torch.isneginf(x), _NEG), group)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0, group=None) -> torch.Tensor:
    """Per-position divergence ``[...]`` from ``[..., vocab shard]`` logits of the same shard on both models;
    ``group``: the tensor-parallel group the vocabulary is split over (None: the whole vocabulary is here).
    The teacher gets no gradient."""
    s = log_softmax(student_logits, temperature, group)
    t = log_softmax(teacher_logits.detach(), temperature, group)
    if beta == 0:
        part = t.exp() * (t - s)
    elif beta == 1:
        part = s.exp() * (s - t)
    else:
        m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
        part = beta * t.exp() * (t - m) + (1 - beta) * s.exp() * (s - m)
    return _SumOverShards.apply(part.sum(dim=-1), group)


def masked_mean(per_position: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the positions ``mask`` marks (TRL's ``batchmean`` with labels: sum / tokens)."""
    if mask is None:
        return per_position.mean()
    mask = mask.to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum().clamp(min=1)
