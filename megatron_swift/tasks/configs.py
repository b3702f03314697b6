"""Each task's own config schema (``task=<name>`` selects it; conf/task/<name>.yaml is type-checked against it).

Kept apart from the task classes so that composing a config imports no torch; each task class names its
schema (``config``) and the ConfigStore registers them all (config.schema.register). Every field carries a
one-line docstring (tests/test_config.py checks this file too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class TaskConfig:
    """What the model is trained to do: the fields every task has."""

    name: str = "lm"
    """lm (pretraining and SFT: token cross-entropy), dpo (pairs, frozen reference), kto (labelled completions, frozen reference), rm (scalar reward head on pairs), cpo / simpo / orpo (pairs, no reference model), gkd (distillation from a teacher), or grpo (online RL from the policy's own completions)."""


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


@dataclass
class CPOConfig(TaskConfig):
    """CPO on preference pairs: a sigmoid preference term on the policy's own log-probabilities plus NLL on the chosen reply; no reference model."""

    name: str = "cpo"
    """Always cpo."""
    beta: float = 0.1
    """Temperature of the preference term: -log sigmoid(beta * (logp_chosen - logp_rejected)), log-probs summed over completion tokens."""
    alpha: float = 1.0
    """Weight of the chosen completion's mean token NLL added to each pair's loss; 0 disables it."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative form); 0 is plain CPO."""


@dataclass
class SimPOConfig(TaskConfig):
    """SimPO on preference pairs: length-normalised log-probabilities with a target margin; no reference model."""

    name: str = "simpo"
    """Always simpo."""
    beta: float = 2.0
    """Reward scale: -log sigmoid(beta * (mean logp_chosen - mean logp_rejected) - gamma), means over completion tokens."""
    gamma_beta_ratio: float = 0.5
    """Target margin over beta: gamma = gamma_beta_ratio * beta."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative form); 0 is plain SimPO."""
    alpha: float = 0.0
    """Weight of the chosen completion's mean token NLL added to each pair's loss (CPO-SimPO); 0 disables it."""


@dataclass
class ORPOConfig(TaskConfig):
    """ORPO on preference pairs: NLL on the chosen reply plus lambda x the log odds-ratio term; no reference model."""

    name: str = "orpo"
    """Always orpo."""
    lambda_: float = 0.1
    """Weight of the odds-ratio term -log sigmoid(log odds(chosen) - log odds(rejected)), on mean token log-probabilities."""


@dataclass
class TeacherConfig:
    """GKD's frozen teacher."""

    model: Optional[str] = None
    """HF folder of the teacher (any supported family); required for task=gkd."""
    tokenizer: Optional[str] = None
    """The teacher's tokenizer (byte, an HF folder or tokenizer.json, a .model); None: the teacher folder's own. Must be the student's."""
    tp: Optional[int] = None
    """Tensor-parallel size of the teacher over the same ranks; None: the student's parallel.tp. Another size needs parallel.pp=1 and no seq_kd; its logits are sent to the student's vocabulary shards."""


@dataclass
class GKDConfig(TaskConfig):
    """GKD: on-policy distillation from a frozen teacher, generalised Jensen-Shannon divergence per token."""

    name: str = "gkd"
    """Always gkd."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher model."""
    lmbda: float = 0.5
    """Fraction of the samples whose completion the student writes itself (rollout engine); the rest keep the data's reply."""
    beta: float = 0.5
    """Generalised JSD interpolation: 0 forward KL(teacher || student), 1 reverse KL(student || teacher)."""
    temperature: float = 0.9
    """Temperature of both distributions in the divergence and of the student's sampling."""
    seq_kd: bool = False
    """Sequence-level KD: the samples not written by the student get a reply the teacher writes (greedy) instead of the data's."""
    max_new_tokens: int = 64
    """Tokens a generated completion may have (the prompt + this is cut at train.seq_length)."""


@dataclass
class SandboxConfig:
    """The code reward's sandbox (rewards/sandbox.py): its isolation and the limits of each job. The limit
    fields are rewards.sandbox.SandboxLimits' own (tests/test_sandbox.py keeps the two equal)."""

    isolation: str = "bwrap"
    """bwrap: each job in bubblewrap boxes (install it: apt-get install bubblewrap); none: unisolated, for code you trust only."""
    cpu_seconds: int = 5
    """CPU time of one job, seconds (the whole job with a cgroup, else each process)."""
    wall_seconds: float = 10
    """Wall-clock time of one job, seconds; then all its processes are killed."""
    memory_mb: int = 512
    """Memory of one job, MiB (the whole job with a cgroup, else each process's address space)."""
    max_processes: int = 8
    """Processes and threads one job may have at once."""
    max_file_mb: int = 16
    """Largest file one job may write, MiB."""
    max_disk_mb: int = 32
    """Size of a job's working directory (a tmpfs), MiB: all its files together."""
    max_open_files: int = 64
    """Open files of each process of a job."""
    max_output_bytes: int = 65536
    """Bytes of stdout/stderr kept per job; a job that writes more is killed (and fails)."""
    workers: int = 4
    """Jobs at once."""
    uid_base: int = 61000
    """When the trainer runs as root: boxes run as host uids from this one up (one per running box; uids of existing accounts are skipped)."""


@dataclass
class JudgeConfig:
    """A generative reward model: a frozen LLM asked to score each completion (the ``judge`` reward)."""

    model: Optional[str] = None
    """HF folder of the judge (any supported family; its own tokenizer and chat template); needed for the judge reward."""
    template: Optional[str] = None
    """Jinja file of the judge's question (variables: prompt, messages, completion, every column); None: a built-in 0-10 question."""
    pattern: str = "(?i)^\\W*(?:final\\s+)?score\\W*?[:=][\\s*_]*(-?\\d+(?:\\.\\d+)?)[\\s*_]*(?:/\\s*10)?[\\s*_.]*$"
    """Regex whose first group is the score, matched on the reply's LAST non-empty line only (default: a final 'Score: N' line); a reply without one is malformed: scores 0 and is counted."""
    min_score: float = 0.0
    """Lowest score the judge may give (before scale); scores outside [min_score, max_score] are clamped."""
    max_score: float = 10.0
    """Highest score the judge may give (before scale)."""
    scale: Optional[float] = 10.0
    """The clamped score is divided by this (10: a 0-10 score becomes 0-1); None keeps it."""
    max_new_tokens: int = 64
    """Tokens the judge may write (greedy)."""


@dataclass
class GRPOConfig(TaskConfig):
    """GRPO: completions drawn from the policy, scored by reward functions, advantages within each prompt's group."""

    name: str = "grpo"
    """Always grpo."""
    num_generations: int = 8
    """Completions per prompt (a group); train.global_batch_size counts completions and must divide by it."""
    max_completion_length: int = 64
    """Tokens a completion may have (prompt + this must fit train.seq_length; 64 suits the bundled prompts and the CPU default seq_length 128)."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy); the loss's log-probabilities use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens up to this probability mass."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: all)."""
    rewards: List[str] = field(default_factory=lambda: ["accuracy"])
    """Reward functions by name: accuracy, format, soft_overlong, repetition, code, judge, or any from task.reward_plugins."""
    reward_weights: Optional[List[float]] = None
    """Weight of each reward (same order as task.rewards); None: 1 each."""
    reward_plugins: List[str] = field(default_factory=list)
    """Python files whose @reward("name") functions become usable in task.rewards."""
    reward_on_error: str = "raise"
    """A reward function that raises: raise (stop, naming the function and row) or zero (score 0, counted)."""
    format_pattern: str = "^<think>.*?</think>\\s*<answer>.*?</answer>$"
    """Regex of the format reward (dot matches newlines)."""
    overlong_buffer: int = 64
    """soft_overlong: the last this many tokens before max_completion_length are penalised linearly, beyond it -1."""
    repetition_ngram: int = 3
    """repetition: n-gram size."""
    repetition_max_penalty: float = -1.0
    """repetition: the penalty when every n-gram repeats."""
    beta: float = 0.04
    """Weight of the KL to the frozen reference (k3 estimator); 0 builds no reference model."""
    ref_model: Optional[str] = None
    """Reference weights (HF folder or checkpoint); None: the starting weights (model.pretrained/load, the initial weights of a run from scratch; with LoRA: the base without adapters)."""
    epsilon: float = 0.2
    """Clipping of the probability ratio below: 1 - epsilon."""
    epsilon_high: Optional[float] = None
    """Clipping above: 1 + epsilon_high (DAPO's clip-higher); None: epsilon."""
    loss_type: str = "grpo"
    """grpo (mean over each completion's tokens, then over completions), bnpo (token mean per micro-batch), dr_grpo (token sum / max_completion_length), dapo (token mean over the global batch)."""
    scale_rewards: str = "group"
    """Advantage scaling: group (divide by the group's reward std), batch (by the batch's), none (Dr. GRPO)."""
    steps_per_generation: int = 1
    """Optimizer steps per batch of completions; above 1 the ratio uses the log-probabilities at generation time."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose completions all got the same reward and draw more prompts."""
    max_resample: int = 3
    """Dynamic sampling: extra rounds of prompts at most per generation; still short, zero-spread groups fill in."""
    generation_batch_size: int = 0
    """Prompts per generation forward (bounds the KV cache's memory); 0: all of a rank's prompts at once."""
    prefill_tokens: int = 1024
    """Padded prompt tokens per prefill forward (rows are split, never a prompt): bounds the prefill's activation memory; 0: the whole generation batch in one forward."""
    log_completions: int = 4
    """Completions per generation written (with their rewards) to completions.jsonl in the run folder and the WandB table."""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    """Limits of the code reward's sandbox."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """The judge reward's model and question."""


SCHEMAS = {"lm": LMConfig, "dpo": DPOConfig, "kto": KTOConfig, "rm": RMConfig, "grpo": GRPOConfig, "cpo": CPOConfig,
           "simpo": SimPOConfig, "orpo": ORPOConfig, "gkd": GKDConfig}
"""Schema of each task name (the task classes in megatron_swift.tasks register under the same names)."""
