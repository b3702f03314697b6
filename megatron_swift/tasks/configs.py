"""Each task's own config schema (``task=<name>`` selects it; conf/task/<name>.yaml is type-checked against it).

Kept apart from the task classes so that composing a config imports no torch; each task class names its
schema (``config``) and the ConfigStore registers them all (config.schema.register). Every field carries a
one-line docstring (tests/test_config.py checks this file too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TaskConfig:
    """What the model is trained to do: the fields every task has."""

    name: str = "lm"
    """lm (pretraining and SFT: token cross-entropy), dpo (pairs, frozen reference), kto (labelled completions, frozen reference) or rm (scalar reward head on pairs)."""


@dataclass
class LMConfig(TaskConfig):
    """Next-token cross-entropy over the tokens the data marks for loss (no fields of its own)."""


@dataclass
class ReferenceConfig(TaskConfig):
    """Objectives measured against a frozen reference model (DPO, KTO)."""

    beta: float = 0.1
    """DPO/IPO/KTO temperature: how far the policy may move from the reference."""
    ref_model: Optional[str] = None
    """Reference weights: an HF folder or a megatron-swift checkpoint; None: the starting weights (model.pretrained or model.load)."""
    precompute_ref: bool = False
    """Compute the reference log-probabilities of every row once before training (saved in the run directory) and free the reference model."""


@dataclass
class DPOConfig(ReferenceConfig):
    """DPO / IPO (and RPO with sft_weight) on preference pairs."""

    name: str = "dpo"
    """Always dpo."""
    loss_type: str = "sigmoid"
    """DPO loss: sigmoid (DPO, with label smoothing) or ipo (on length-averaged log-probabilities)."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative DPO); 0 is plain DPO."""
    sft_weight: float = 0.0
    """Weight of the chosen completion's mean token NLL added to the DPO loss (RPO); 0 disables it."""


@dataclass
class KTOConfig(ReferenceConfig):
    """KTO on single completions labelled desirable or not."""

    name: str = "kto"
    """Always kto."""
    desirable_weight: float = 1.0
    """Weight of the loss of desirable (label true) examples."""
    undesirable_weight: float = 1.0
    """Weight of the loss of undesirable (label false) examples."""


@dataclass
class RMConfig(TaskConfig):
    """A reward model: a scalar head trained on preference pairs."""

    name: str = "rm"
    """Always rm."""
    center_rewards_coefficient: float = 0.0
    """Weight of (r_chosen + r_rejected)^2 added to each pair's loss, keeping rewards centred on 0; 0 disables it."""


SCHEMAS = {"lm": LMConfig, "dpo": DPOConfig, "kto": KTOConfig, "rm": RMConfig}
"""Schema of each task name (the task classes in megatron_swift.tasks register under the same names)."""
