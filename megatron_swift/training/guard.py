"""The numerical guard: a step whose loss or gradient norm is not finite (or whose loss spikes) is skipped.

megatron-core 0.16 skips an update only when fp16 loss scaling finds inf/nan
gradients; in bf16 and fp32 a NaN gradient goes straight into the weights and
every later step is NaN. The guard extends the skip to every precision:

- before the optimizer step the loop tells it the step's loss (``observe_loss``);
- the optimizer's own ``get_grad_norm`` is recorded, and its
  ``step_with_ready_grads`` (the update itself, after clipping) is not run when
  the loss or the norm is non-finite or the loss is a spike. All three
  megatron-core optimizer classes (FP32Optimizer, MixedPrecisionOptimizer,
  ChainedOptimizer) call exactly these two methods from ``step()``, so wrapping
  them on the optimizer instance is the one place the skip is decided.

Every rank reaches the same verdict: the gradient norm is reduced over the
model-parallel (and, with the distributed optimizer, data-parallel) ranks by
megatron-core, and the loss verdict is shared over the pipeline stages here.
A skipped step consumes its batch and counts as an iteration (as in
Megatron-LM); the scheduler does not advance. ``max_skipped`` consecutive
skips stop the run with :class:`Diverged`.

The loss is shared over the pipeline stages too, so every rank holds the same
window of recent losses: rank 0 stores the guard's ``state()`` with each
checkpoint and a resume ``restore``s it, so a spike after the resume point is
judged as it would have been without the interruption.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Callable, Deque, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_swift.training.errors import Diverged


class StepGuard:
    """Decides, once per step, whether the optimizer update is applied."""

    def __init__(self, max_skipped: int, spike_factor: Optional[float] = None, spike_window: int = 20):
        self.max_skipped = max_skipped
        self.spike_factor = spike_factor
        self.recent: Deque[float] = deque(maxlen=spike_window)
        self.consecutive = 0
        self.total_skipped = 0
        self.reason: Optional[str] = None  # why the current step was skipped, None when it was applied
        self._loss_problem: Optional[str] = None
        self._grad_norm: Optional[float] = None
        self._pending_loss: Optional[float] = None
        self.last_reason: Optional[str] = None

    def install(self, optimizer) -> None:
        """Wrap the optimizer's grad-norm and update methods (see the module docstring)."""
        get_grad_norm, step_with_ready_grads = optimizer.get_grad_norm, optimizer.step_with_ready_grads

        def recorded_grad_norm():
            self._grad_norm = get_grad_norm()
            return self._grad_norm

        def guarded_update() -> bool:
            self.reason = self._verdict()
            return False if self.reason else step_with_ready_grads()

        optimizer.get_grad_norm = recorded_grad_norm
        optimizer.step_with_ready_grads = guarded_update

    def observe_loss(self, loss: Optional[float], device) -> None:
        """The step's loss (None off the last pipeline stage); call before ``optimizer.step()``."""
        self.reason, self._grad_norm = None, None
        problem = 0.0
        if loss is not None:
            if not math.isfinite(loss):
                problem = 1.0
            elif self._is_spike(loss):
                problem = 2.0
        if ps.get_pipeline_model_parallel_world_size() > 1:
            # Only the last stage has the loss: one sum over the stages (the others add zeros) gives every
            # stage the verdict and the loss itself (float64: exactly), so every rank keeps the same window.
            shared = torch.tensor([problem, 0.0 if loss is None else loss], dtype=torch.float64, device=device)
            dist.all_reduce(shared, group=ps.get_pipeline_model_parallel_group())
            problem, loss = shared.tolist()
        self._loss_problem = {0.0: None, 1.0: "non-finite loss", 2.0: "loss spike"}[problem]
        self._pending_loss = loss

    def _is_spike(self, loss: float) -> bool:
        if self.spike_factor is None or len(self.recent) < self.recent.maxlen:
            return False
        return loss > self.spike_factor * (sum(self.recent) / len(self.recent))

    def _verdict(self) -> Optional[str]:
        if self._loss_problem:
            return self._loss_problem
        if self._grad_norm is not None and not math.isfinite(float(self._grad_norm)):
            return "non-finite gradient norm"
        return None

    def end_step(self, fp16_skipped: bool) -> Optional[str]:
        """Count the step's outcome; returns why it was skipped (None: applied)."""
        reason = self.reason or self._loss_problem or ("fp16 loss-scale overflow" if fp16_skipped else None)
        if reason is None:
            self.consecutive = 0
            if self._pending_loss is not None:
                self.recent.append(self._pending_loss)
            return None
        self.consecutive += 1
        self.total_skipped += 1
        self.last_reason = reason
        return reason

    def skipping(self) -> bool:
        """Whether the latest steps were skipped (a streak is under way): no checkpoint is saved then."""
        return self.consecutive > 0

    def state(self) -> dict:
        """What a checkpoint keeps of the guard (plain JSON: floats round-trip exactly)."""
        return {"recent": list(self.recent), "consecutive": self.consecutive, "skipped_steps": self.total_skipped,
                "last_reason": self.last_reason}

    def restore(self, state: Optional[dict]) -> None:
        """Continue from a checkpoint's ``state()`` (None: a checkpoint from before it was kept)."""
        if not state:
            return
        self.recent.clear()
        self.recent.extend(state["recent"])  # a shorter train.loss_spike_window keeps the newest losses
        self.consecutive, self.total_skipped = state["consecutive"], state["skipped_steps"]
        self.last_reason = state["last_reason"]

    def check(self, iteration: int, before_streak: Optional[Callable[[int], Optional[str]]] = None) -> None:
        """Raise :class:`Diverged` after ``max_skipped`` consecutive skips (fp16 loss-scale overflows, which
        the loss scaler handles, do not count). ``before_streak(step)`` names the newest checkpoint of a step
        no later than ``step`` (the last one before the skipped steps), or None."""
        if self.consecutive < self.max_skipped or self.last_reason == "fp16 loss-scale overflow":
            return
        good = iteration - self.consecutive  # the last step whose update was applied
        ckpt = before_streak(good) if before_streak is not None else None
        where = (f"Resume from {ckpt} (saved before the skipped steps)" if ckpt else
                 f"No checkpoint was saved at or before step {good}: start again")
        raise Diverged(f"training diverged: {self.consecutive} consecutive steps skipped (steps {good + 1}-"
                       f"{iteration}, last: {self.last_reason}); their updates were not applied. {where} with a "
                       "lower train.lr, longer train.lr_warmup_iters or tighter train.clip_grad "
                       "(train.max_skipped_steps sets how many skips are tolerated)")
