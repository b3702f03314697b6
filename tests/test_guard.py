"""The numerical guard's decisions, on an optimizer double that calls the two hooks in megatron-core's order
(get_grad_norm, then step_with_ready_grads) as all three of its optimizer classes do."""
from __future__ import annotations

import math

import pytest

from megatron_swift.training.errors import Diverged
from megatron_swift.training.guard import StepGuard


pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/conftest.py


class FakeOptimizer:
    """megatron-core's step(): grad norm, clip, then the update; counts applied updates."""

    def __init__(self):
        self.norm, self.updates = 1.0, 0

    def get_grad_norm(self):
        return self.norm

    def step_with_ready_grads(self):
        self.updates += 1
        return True

    def step(self):
        norm = self.get_grad_norm()
        return self.step_with_ready_grads(), norm, None


def one_step(guard, opt, loss, norm=1.0):
    opt.norm = norm
    guard.observe_loss(loss, "cpu")
    ok, _, _ = opt.step()
    return guard.end_step(fp16_skipped=not ok)


def test_non_finite_loss_or_norm_skips_the_update_and_three_in_a_row_stop_the_run():
    guard, opt = StepGuard(max_skipped=3), FakeOptimizer()
    guard.install(opt)
    assert one_step(guard, opt, 2.0) is None and opt.updates == 1
    assert one_step(guard, opt, math.nan) == "non-finite loss"
    assert one_step(guard, opt, 2.0, norm=math.inf) == "non-finite gradient norm"
    assert opt.updates == 1  # neither bad step reached the weights
    guard.check(3)  # two in a row: tolerated
    assert one_step(guard, opt, 2.0) is None and opt.updates == 2  # a good step resets the count
    for step in range(4, 7):
        assert one_step(guard, opt, math.inf) == "non-finite loss"
    with pytest.raises(Diverged, match=r"3 consecutive steps skipped \(last at step 7: non-finite loss\)"):
        guard.check(7)
    assert guard.total_skipped == 5 and opt.updates == 2


def test_loss_spike_is_judged_against_the_mean_of_the_last_good_steps():
    guard, opt = StepGuard(max_skipped=5, spike_factor=3.0, spike_window=4), FakeOptimizer()
    guard.install(opt)
    assert one_step(guard, opt, 100.0) is None  # fewer than 4 good steps: no judgement yet
    for loss in (2.0, 2.0, 2.0, 2.0):  # the window now holds 2, 2, 2, 2 (the 100 slid out)
        assert one_step(guard, opt, loss) is None
    assert one_step(guard, opt, 6.1) == "loss spike"  # > 3 x mean 2.0
    assert one_step(guard, opt, 5.9) is None  # < 3 x 2.0
    assert opt.updates == 6


def test_fp16_overflow_skips_do_not_count_as_divergence():
    guard, opt = StepGuard(max_skipped=2), FakeOptimizer()
    guard.install(opt)
    for _ in range(4):
        guard.observe_loss(2.0, "cpu")
        assert guard.end_step(fp16_skipped=True) == "fp16 loss-scale overflow"
    guard.check(4)  # the loss scaler deals with these
    assert guard.total_skipped == 4
