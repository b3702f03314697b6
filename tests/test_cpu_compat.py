"""backend/cpu_compat.py: megatron-core's named RNG states on the CPU generator, without false alarms."""
import logging

import pytest
import torch

pytestmark = pytest.mark.usefixtures("world_of_one")


def test_dropout_inside_the_rng_tracker_draws_from_its_state_without_a_warning(caplog):
    """Issue 27, item 6: on CPU every dropout inside the tracker's fork() logged "CPU RNG state changed within
    GPU RNG context" (16 lines a step with LoRA dropout): the tracked generator is the CPU one there."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    caplog.set_level(logging.WARNING)
    with tracker.fork():
        first = torch.nn.functional.dropout(torch.ones(64), 0.5)
    with tracker.fork():
        second = torch.nn.functional.dropout(torch.ones(64), 0.5)
    assert not torch.equal(first, second)  # the tracked state moved on between the two forks
    assert "RNG state changed" not in caplog.text
