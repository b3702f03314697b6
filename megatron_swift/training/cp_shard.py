"""The one place a micro-batch is cut down to this rank's part of the sequence (context parallelism).

megatron-core's load-balanced split (``megatron.core.utils.get_batch_on_this_cp_rank``): the sequence
is cut into 2 x cp chunks and CP rank r keeps chunks r and 2cp-1-r, so that under causal attention
every rank has the same work; megatron-core slices the rotary embeddings the same way. Tokens, labels,
loss mask, position ids and a VLM's image_index are cut (its images stay whole: each rank places the
feature rows its positions name); ``segments`` (packed rows) stays whole, because the attention of
every CP rank covers the whole sequence (models.ulysses builds the full block mask from it).

The tasks whose loss is per sample (DPO, KTO, RM) then need sums over the whole row
(:func:`sum_over_cp`), a value at a position some rank holds (:func:`at_positions`), and counts made
once per CP group (:func:`counted_once`).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_swift.data.sampler import Batch

SEQUENCE_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "image_index")


def cp_size() -> int:
    """The context-parallel size (1 outside a run: the task losses are also used on their own)."""
    return ps.get_context_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def shard(batch: Batch) -> Batch:
    """This CP rank's part of ``batch`` (the batch itself when cp = 1)."""
    if cp_size() == 1:
        return batch
    # M-RoPE's [3, b, s] positions stay whole: megatron-core's MultimodalRotaryEmbedding (0.16) computes the
    # rotary table of the whole sequence and keeps this CP rank's chunks itself.
    names = [n for n in SEQUENCE_FIELDS if not (n == "position_ids" and batch.position_ids.dim() == 3)]
    parts = get_batch_on_this_cp_rank({name: getattr(batch, name) for name in names})
    return dataclasses.replace(batch, **parts)


def unshard(local: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The whole sequence again from every CP rank's part of it (e.g. per-token losses for a report):
    all-gathered over the CP group and put back in sequence order. Not differentiable."""
    cp = cp_size()
    if cp == 1:
        return local
    pieces = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(pieces, local.contiguous(), group=ps.get_context_parallel_group())
    chunks = [None] * (2 * cp)
    for r, piece in enumerate(pieces):  # rank r holds chunks r and 2cp-1-r
        chunks[r], chunks[2 * cp - 1 - r] = piece.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def sum_over_cp(x: torch.Tensor) -> torch.Tensor:
    """Per-row sums of this rank's tokens -> sums over the whole row, on every CP rank. The backward is
    the identity: each rank's tokens get the gradient of the (same) loss computed from the total."""
    if cp_size() == 1:
        return x
    return reduce_from_tensor_model_parallel_region(x, group=ps.get_context_parallel_group())


def at_positions(local: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``local`` [rows, this rank's part of seq, ...] -> the value at each row's position in the whole
    sequence (``positions`` [rows]), on every CP rank; the gradient goes to the rank that holds it."""
    rows = torch.arange(local.shape[0], device=local.device)
    positions = positions.to(local.device)
    cp = cp_size()
    if cp == 1:
        return local[rows, positions]
    chunk, rank = local.shape[1] // 2, ps.get_context_parallel_rank()
    which = positions // chunk  # chunk of the whole sequence; this rank holds chunks rank and 2cp-1-rank
    mine = (which == rank) | (which == 2 * cp - 1 - rank)
    index = torch.where(which == rank, positions % chunk, chunk + positions % chunk)
    picked = local[rows, index]
    return sum_over_cp(torch.where(mine.view(-1, *[1] * (picked.dim() - 1)), picked, torch.zeros_like(picked)))


def counted_once(loss_func):
    """Wrap a per-sample loss function (DPO, KTO, RM: every CP rank computes the same per-sample losses
    from CP sums) so that its count and reports come from CP rank 0 only: they are summed over DP and CP
    ranks afterwards (finalize_model_grads, tasks.reports). The loss itself stays on every rank: each
    rank's backward carries the gradient through its own tokens."""
    if cp_size() == 1:
        return loss_func
    keep = float(ps.get_context_parallel_rank() == 0)

    def wrapped(*args, **kwargs):
        loss, count, report = loss_func(*args, **kwargs)
        return loss, count * int(keep), {name: value * keep for name, value in report.items()}

    return wrapped
