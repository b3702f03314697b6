"""Forward passes without gradients through megatron-core's schedules, collecting a value per micro-batch.

Used for a reference model's log-probabilities (tasks.reference) and by the precision check (tools/convert/check.py).
Works under every layout the trainer supports; the values exist on the last pipeline stage only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func


@contextlib.contextmanager
def eval_mode(model: List[torch.nn.Module]):
    """The chunks in eval mode (no dropout; megatron-core's KV-cache path needs it) inside the block, then in
    the mode each was in."""
    modes = [chunk.training for chunk in model]
    for chunk in model:
        chunk.eval()
    try:
        yield
    finally:
        for chunk, mode in zip(model, modes):
            chunk.train(mode)


def collect(model: List[torch.nn.Module], batches: list, forward: Callable, reduce: Callable, seq_length: int,
            micro_batch_size: int) -> list:
    """``reduce(batch, forward(batch, chunk))`` for each batch, in order (an empty list off the last stage).

    ``micro_batch_size`` is the number of rows of each batch (pipeline messages are sized by it)."""
    def step(data_iterator, chunk):
        batch = next(data_iterator)
        return forward(batch, chunk), lambda output, non_loss_data=False: reduce(batch, output)

    iterators = [iter(batches) for _ in model]
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iterators if len(iterators) > 1 else iterators[0], model=model,
            num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
            forward_only=True, collect_non_loss_data=True)
