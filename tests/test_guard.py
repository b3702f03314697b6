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
    with pytest.raises(Diverged, match=r"3 consecutive steps skipped \(steps 5-7, last: non-finite loss\)"):
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


def test_the_spike_test_uses_the_window_mean_not_the_last_loss():
    """Windows whose last loss differs from their mean: comparing with the last loss gives the other verdict."""
    guard, opt = StepGuard(max_skipped=5, spike_factor=3.0, spike_window=4), FakeOptimizer()
    guard.install(opt)
    for loss in (1.0, 1.0, 1.0, 5.0):  # mean 2: the limit is 6 (15 against the last loss)
        one_step(guard, opt, loss)
    assert one_step(guard, opt, 6.5) == "loss spike"
    guard, opt = StepGuard(max_skipped=5, spike_factor=3.0, spike_window=4), FakeOptimizer()
    guard.install(opt)
    for loss in (5.0, 1.0, 1.0, 1.0):  # mean 2: the limit is 6 (3 against the last loss)
        one_step(guard, opt, loss)
    assert one_step(guard, opt, 4.0) is None


def test_guard_state_survives_a_checkpoint_round_trip_exactly():
    """What a checkpoint record keeps (JSON) gives a resumed guard the same window and counts, so a spike after
    the resume point is judged as without the interruption."""
    import json

    losses = [2.0 + 1e-3 * math.pi * k for k in range(4)]  # floats that must survive JSON bit for bit
    guard, opt = StepGuard(max_skipped=5, spike_factor=3.0, spike_window=4), FakeOptimizer()
    guard.install(opt)
    for loss in losses:
        one_step(guard, opt, loss)
    assert one_step(guard, opt, math.nan) == "non-finite loss"
    resumed, opt2 = StepGuard(max_skipped=5, spike_factor=3.0, spike_window=4), FakeOptimizer()
    resumed.install(opt2)
    resumed.restore(json.loads(json.dumps(guard.state())))
    assert list(resumed.recent) == losses and resumed.total_skipped == 1 and resumed.consecutive == 1
    assert one_step(resumed, opt2, 7.0) == "loss spike" == one_step(guard, opt, 7.0)
    assert resumed.state() == guard.state()
    StepGuard(max_skipped=5).restore(None)  # a checkpoint from before guard state was kept


def test_divergence_names_the_newest_checkpoint_from_before_the_streak():
    guard, opt = StepGuard(max_skipped=2), FakeOptimizer()
    guard.install(opt)
    for loss in (2.0, 2.0, 2.0, math.nan, math.nan):  # steps 1-3 applied, 4-5 skipped
        one_step(guard, opt, loss)
    asked = []

    def before_streak(step):
        asked.append(step)
        return "/run/checkpoints/iter_0000002"

    with pytest.raises(Diverged, match=r"steps 4-5.*Resume from /run/checkpoints/iter_0000002 \(saved before"):
        guard.check(5, before_streak)
    assert asked == [3] and guard.skipping()
    with pytest.raises(Diverged, match=r"No checkpoint was saved at or before step 3"):
        guard.check(5, lambda step: None)


class FakeScheduler:
    def __init__(self, optimizer):
        self.optimizer, self.steps = optimizer, 0

    def step(self, increment):
        self.steps += increment
        self.optimizer.param_groups[0]["lr"] = 1e-3 * (1 + self.steps)  # a schedule that always moves


def test_the_scheduler_stays_put_while_steps_are_skipped():
    """Trainer.train_step on doubles: a skipped step leaves the schedule (and so the next step's lr) where it was."""
    from types import SimpleNamespace

    from megatron_swift.training.loop import Trainer

    opt = FakeOptimizer()
    opt.param_groups = [{"lr": 1e-3}]
    opt.zero_grad = lambda: None
    guard = StepGuard(max_skipped=5)
    guard.install(opt)
    losses = iter([2.0, math.nan, math.inf, 2.0])
    trainer = Trainer.__new__(Trainer)
    dense = SimpleNamespace(num_moe_experts=None, moe_aux_loss_coeff=0.0)  # a chunk's config: no MoE loss to report
    chunk = SimpleNamespace(zero_grad_buffer=lambda: None, config=dense)
    trainer.model, trainer.optimizer, trainer.guard = [chunk], opt, guard
    trainer.scheduler, trainer.sampler, trainer.train_data = FakeScheduler(opt), None, None
    trainer.backend = SimpleNamespace(torch_device="cpu")
    trainer._microbatches = lambda *a: []
    trainer._forward_backward = lambda *a: []
    trainer._task_metrics = lambda reports: {"loss": next(losses)}
    outcomes = [trainer.train_step(i) for i in range(4)]
    assert [o[3] for o in outcomes] == [None, "non-finite loss", "non-finite loss", None]
    assert [o[2] for o in outcomes] == [1e-3, 2e-3, 2e-3, 2e-3]  # the lr each step used
    assert trainer.scheduler.steps == 2 and opt.updates == 2


def test_a_stop_while_steps_are_skipped_saves_nothing_and_names_the_checkpoint_from_before(tmp_path, capsys):
    """SIGTERM mid-streak: no checkpoint of the streak (a resume repeats it from before, guard state included)."""
    import json

    from megatron_swift.training.loop import Trainer

    ckpt = tmp_path / "checkpoints" / "iter_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "megatron_swift.json").write_text(json.dumps({"iteration": 4, "complete": True, "manifest": {}}))
    guard, opt = StepGuard(max_skipped=5), FakeOptimizer()
    guard.install(opt)
    for loss in (2.0, math.nan, math.nan):  # step 5 applied, 6-7 skipped
        one_step(guard, opt, loss)
    trainer = Trainer.__new__(Trainer)
    trainer.guard, trainer.output_dir, trainer.state = guard, str(tmp_path), type("S", (), {"iteration": 7})()
    trainer._save = lambda: pytest.fail("saved in the middle of a skip streak")
    trainer._stop("SIGTERM")
    out = capsys.readouterr().out
    assert trainer.stopped == "SIGTERM" and f"not saved (the newest checkpoint is {ckpt}, from before them)" in out
