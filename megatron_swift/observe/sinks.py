"""Metric sinks on the logging rank: console, metrics.jsonl, TensorBoard, WandB."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from megatron_swift.observe.metrics_file import open_metrics
from megatron_swift.observe.progress import Progress

# Scalars sent to TensorBoard/WandB under these names.
_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu", "memory_gib", "epoch",
            "consumed_samples", "loss_scale")


class Sinks:
    """Created on every rank; only the rank that holds the loss writes anything."""

    def __init__(self, cfg, output_dir: str, config_dict: dict, active: bool, progress: Progress, printer=print,
                 resumed_at: int = 0):
        self.active = active
        self.progress = progress
        self.printer = printer
        self._metrics = None
        self._tb = None
        self._wandb = None
        if not active:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._metrics = open_metrics(output_dir, resumed_at)  # rows of steps to be redone moved out
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))
        wb = cfg.logging.wandb
        if wb.project and wb.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=wb.project,
                name=wb.name or os.path.basename(os.path.abspath(output_dir)),
                tags=list(wb.tags),
                mode=wb.mode,
                dir=output_dir,
                config=config_dict,
                resume="allow",
                id=_wandb_id(output_dir),
            )

    def log(self, metrics: Dict[str, Optional[float]], console: bool = True) -> None:
        if not self.active:
            return
        step = int(metrics["iteration"])
        self._metrics.write(json.dumps(metrics) + "\n")
        self._metrics.flush()
        # Task figures are named "<group>/<name>" (rewards/chosen, logps/rejected, ...).
        scalars = {k: v for k, v in metrics.items() if (k in _SCALARS or "/" in k) and v is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"train/{key}", value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if console:
            self.printer(self.progress.line(metrics))

    def log_samples(self, iteration: int, samples) -> None:
        """Example outputs (e.g. GRPO's completions with their rewards) as a WandB table."""
        if not self.active or self._wandb is None or not samples:
            return
        import wandb

        columns = list(samples[0])
        rows = [[v if isinstance(v, (int, float, str)) else json.dumps(v) for v in (s.get(c) for c in columns)]
                for s in samples]
        self._wandb.log({"train/completions": wandb.Table(columns=columns, data=rows)}, step=iteration)

    def log_eval(self, iteration: int, figures: Dict[str, float]) -> None:
        """Evaluation figures (``loss``, or e.g. GRPO's ``reward``): ``eval_<name>`` in metrics.jsonl,
        ``eval/<name>`` in TensorBoard and WandB."""
        if not self.active:
            return
        self._metrics.write(json.dumps({"iteration": iteration, **{f"eval_{k}": v for k, v in figures.items()}})
                            + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in figures.items():
                self._tb.add_scalar(f"eval/{key}", value, iteration)
        if self._wandb is not None:
            self._wandb.log({f"eval/{k}": v for k, v in figures.items()}, step=iteration)
        self.printer(f"eval at step {iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(output_dir: str) -> str:
    """One WandB run per run directory, so a resumed run continues its charts."""
    path = os.path.join(output_dir, "wandb_run_id")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_id)
    return run_id
