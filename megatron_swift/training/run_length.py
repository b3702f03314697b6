"""How many optimizer steps a run takes, from train.max_epochs and train.train_iters.

``steps_per_epoch = num_samples // global_batch_size`` (see data.sampler for
what happens to the remainder). The run stops at
``min(train_iters, max_epochs * steps_per_epoch)``, taking an unset limit as
infinite. Epoch ``e`` (0-based) covers iterations
``[e * steps_per_epoch, (e + 1) * steps_per_epoch)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_swift.data.errors import DataError


@dataclass(frozen=True)
class RunLength:
    steps_per_epoch: int
    total_iters: int
    max_epochs: Optional[int]

    def epoch_of(self, iteration: int) -> int:
        """0-based epoch that the step with 0-based index ``iteration`` belongs to."""
        return iteration // self.steps_per_epoch

    def ends_epoch(self, done_iters: int) -> bool:
        """True when ``done_iters`` completed steps finish an epoch."""
        return done_iters > 0 and done_iters % self.steps_per_epoch == 0


def plan(num_samples: int, global_batch_size: int, max_epochs: Optional[int], train_iters: Optional[int],
         data: Optional[Sequence[str]] = None) -> RunLength:
    """The run's length; DataError when the data cannot fill one global batch. ``data``: the training files
    (data.path), named in that message."""
    steps_per_epoch = num_samples // global_batch_size
    if steps_per_epoch == 0:
        raise too_few_samples(num_samples, global_batch_size, data)
    limits = [x for x in (train_iters, None if max_epochs is None else max_epochs * steps_per_epoch) if x is not None]
    return RunLength(steps_per_epoch, min(limits), max_epochs)


def too_few_samples(num_samples: int, global_batch_size: int, data: Optional[Sequence[str]]) -> DataError:
    """The error for data that holds fewer samples than one global batch (an epoch of zero steps). It is a
    DataError so that it ends the run with one line (cli.run_or_exit) naming the files and the keys to change."""
    where = ",".join(data) if data else "data.path"
    return DataError(where, None, f"{num_samples} training samples, fewer than train.global_batch_size="
                     f"{global_batch_size} (one step); lower train.global_batch_size (a multiple of "
                     "train.micro_batch_size x data-parallel size) or add data (data.path); for text data a "
                     "shorter train.seq_length also gives more samples")
