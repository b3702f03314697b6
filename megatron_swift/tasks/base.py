"""The task contract: what a training objective gives the loop, and the registry by ``task.name``.

A task is a class registered with :func:`register` under its ``name``. It names its config schema
(``config``, from tasks/configs.py: Hydra type-checks ``task=<name>`` against it), checks the run's
config before any heavy work (``validate``), and builds itself for a run (``build``). The loop then asks
it for megatron-core's forward step, any per-step preparation, and its metrics. Nothing outside this
package branches on a task's name.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Protocol, runtime_checkable

from megatron_swift.tasks.configs import SCHEMAS


@runtime_checkable
class Task(Protocol):
    name: str
    """The ``task.name`` it is registered under."""
    config: type
    """Its config schema (a TaskConfig subclass in tasks/configs.py)."""
    rows_per_sample: int
    """Rows of seq_length the model runs per sample (2 for pairs)."""
    forward_passes: float
    """Model forward+backward passes per row, for FLOP counting."""
    head: str
    """The model's output layer: lm or reward (models.builder)."""
    read_data: Optional[Callable]
    """How it reads its rows: (paths, data_cfg, tokenizer, seq_length, folder, cfg=run config, vision=a VLM's
    data.images.VisionData or None) -> dataset; None: data.source. A dataset with ``samples_per_epoch`` counts
    that many samples per epoch, not its length."""
    takes_images: bool
    """Whether it trains a vision-language model on rows with images; False: validation refuses it for a VLM
    with ``no_images_why`` (one line saying why)."""

    # Optional: ``reference_copies(cfg) -> int``, frozen copies of the policy's weights the run holds (a
    # reference model; the memory planner adds their weights; absent: 0).
    # Optional: ``frozen_model(cfg) -> plan.memory.FrozenModel``, a frozen model of another architecture the run
    # holds (GKD's teacher; the planner adds its weights on its layout; absent: none).
    # Optional: ``data_keys``, names of task.* settings that decide which samples a step trains on (a resume with
    # one changed is refused, like data.* settings; training/resume_check.py).

    @classmethod
    def validate(cls, cfg, problems: List[str]) -> None:
        """Append one line per problem with ``cfg`` (naming the key to change)."""

    @classmethod
    def build(cls, cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".", model=None):
        """The task for this run; ``datasets`` are (name, dataset) pairs it may precompute over."""

    def forward_step(self) -> Callable:
        """megatron-core's forward_step_func: (data_iterator, model) -> (output, loss_func)."""

    def batch_source(self, dataset):
        """Optional: an object the loop asks for each step's micro-batches (``microbatches(iteration)``, with
        ``state()``/``restore()`` kept in checkpoints) instead of reading ``dataset``'s rows; e.g. rollouts."""

    def prepare(self, batches, dataset=None) -> None:
        """Work before the step's forward/backward (e.g. a reference model's log-probabilities)."""

    def metrics(self, reports: List[dict], device) -> Dict[str, float]:
        """The step's figures from the loss functions' reports (valid on the last pipeline stage)."""


TASKS: Dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` the task ``cls.name``, with the schema registered for that name."""
    if SCHEMAS.get(cls.name) is not cls.config:
        raise TypeError(f"task {cls.name}: its config {cls.config.__name__} is not tasks.configs.SCHEMAS[{cls.name!r}]")
    TASKS[cls.name] = cls
    return cls


def rows_from_jsonl(cfg, problems: List[str]) -> None:
    """Tasks whose rows have their own JSONL shape (pairs, labelled completions): what they need of data."""
    task, data = cfg.task, cfg.data
    if data.source not in ("jsonl", "sft", "vl_sft"):
        problems.append(f"task={task.name} reads its rows from JSONL files; data.source={data.source} "
                        "is not one (use data=sft or data=jsonl with data.path)")
    if data.packing or data.streaming:
        problems.append(f"task={task.name} does not support data.packing or data.streaming yet")
