"""The console progress line."""
from __future__ import annotations

import time
from typing import Dict, Optional


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    """Formats one line per logged step. ETA: the mean step time since the warm-up steps (the first steps of a
    run or resume pay one-off costs: allocation, first checkpoint-free graph, caches), ``--`` until then."""

    WARMUP_STEPS = 2

    def __init__(self, total_iters: int, max_epochs: Optional[int], start_iter: int):
        self.total_iters = total_iters
        self.max_epochs = max_epochs
        self.start_iter = start_iter
        self.base: Optional[tuple] = None  # (iteration, time) when the warm-up was over

    def eta(self, iteration: int) -> str:
        now = time.monotonic()
        if self.base is None and iteration - self.start_iter >= self.WARMUP_STEPS:
            self.base = (iteration, now)
            return "--"
        if self.base is None or iteration == self.base[0]:
            return "--"
        per_step = (now - self.base[1]) / (iteration - self.base[0])
        return _hms(per_step * (self.total_iters - iteration))

    def line(self, m: Dict[str, float]) -> str:
        eta = self.eta(m["iteration"])
        epochs = f"/{self.max_epochs}" if self.max_epochs else ""
        parts = [
            f"step {m['iteration']}/{self.total_iters}",
            f"epoch {m['epoch']:.2f}{epochs}",
            f"loss {m['loss']:.4f}",
        ]
        if m.get("rewards/mean") is not None:  # online RL (GRPO): the mean reward of the step's completions
            parts.append(f"reward {m['rewards/mean']:.3f} len {m['completions/mean_length']:.0f}"
                         + (f" kl {m['policy/kl']:.4f}" if m.get("policy/kl") is not None else ""))
        elif m.get("rewards/accuracies") is not None:  # pairs: DPO, IPO, reward models
            parts.append(f"reward acc {m['rewards/accuracies']:.2f} margin {m['rewards/margins']:.3f}")
        elif m.get("kl") is not None:  # KTO
            parts.append(f"kl {m['kl']:.3f} margin {m['rewards/margins']:.3f}")
        parts += [
            f"lr {m['lr']:.2e}",
            f"gnorm {m['grad_norm']:.3f}",
            f"{_si(m['tokens_per_s'])} tok/s",
            f"{m['tflops_per_device']:.2f} TFLOP/s/dev",
        ]
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        parts += [f"mem {m['memory_gib']:.2f} GiB", f"ETA {eta}"]
        if m.get("skip_reason"):  # the update was not applied (training.guard)
            parts.append(f"SKIPPED: {m['skip_reason']} ({m['skipped_steps']} so far)")
        return " | ".join(parts)
