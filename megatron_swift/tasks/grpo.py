"""GRPO: online RL from the policy's own completions (rollout/source.py makes the batches).

The loss (training/grpo_losses.py) needs per-token log-probabilities at the sampling temperature, so the
forward step asks the model for logits and takes the vocabulary-parallel cross-entropy of logits / T
itself (correct under TP; the values exist on the last pipeline stage). Entropy, KL, clipping and the
ratio are reported per completion token.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_swift.data.prompts import prompt_source, stop_token_ids
from megatron_swift.data.templates import load_template
from megatron_swift.rollout.megatron_engine import MegatronEngine
from megatron_swift.rollout.source import RolloutSource
from megatron_swift.tasks.base import register, rows_from_jsonl
from megatron_swift.tasks.configs import GRPOConfig
from megatron_swift.tasks.reports import reduce_reports
from megatron_swift.training import grpo_losses
from megatron_swift.training.forward_only import collect, eval_mode


def read_prompts(paths, data_cfg, tokenizer, seq_length: int, folder, cfg=None, vision=None):
    """The task's rows: prompts (data.prompts); one epoch is every prompt once, num_generations times (text
    only: validation refuses a VLM, ``vision`` is never given)."""
    from megatron_swift.data.errors import DataError
    from megatron_swift.rewards.scoring import REQUIRED_COLUMNS

    rows = prompt_source(paths, data_cfg, tokenizer, seq_length, folder, cfg.task.max_completion_length)
    for name in cfg.task.rewards:  # a column a built-in reward reads must be in every row
        column = REQUIRED_COLUMNS.get(name)
        missing = next((i for i, row in enumerate(rows.columns) if row.get(column) is None), None) if column else None
        if missing is not None:
            path, line = rows.where[missing].rsplit(":", 1)
            raise DataError(path, int(line), f"row has no {column!r}, which the {name} reward (task.rewards) reads")
    if list(paths) != list(cfg.data.path):  # held-out prompts (data.eval_path): scored, never trained on
        return rows
    per_generation = cfg.train.global_batch_size * cfg.task.steps_per_generation // cfg.task.num_generations
    generations = len(rows) // per_generation
    if generations == 0:
        raise DataError(",".join(paths), None, f"{len(rows)} usable prompts, fewer than the {per_generation} one "
                        "generation takes (train.global_batch_size x task.steps_per_generation / "
                        "task.num_generations)")
    rows.samples_per_epoch = generations * cfg.task.steps_per_generation * cfg.train.global_batch_size
    return rows


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """[b, s, V/tp] vocabulary-parallel logits -> [b, s] log-probability of each label at the temperature."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return -vocab_parallel_cross_entropy(scaled, labels)


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[b, s] entropy of the softmax over the whole (tensor-parallel) vocabulary; no gradient."""
    with torch.no_grad():
        x = logits.float() / (temperature if temperature > 0 else 1.0)
        group = ps.get_tensor_model_parallel_group()
        top = x.max(-1, keepdim=True).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(x - top)  # padding columns are -inf: exp 0, and they add nothing below
        z = e.sum(-1, keepdim=True)
        ex = torch.where(e > 0, e * (x - top), torch.zeros_like(e)).sum(-1, keepdim=True)
        stats = torch.cat([z, ex], -1)
        dist.all_reduce(stats, group=group)
        return (torch.log(stats[..., 0]) - stats[..., 1] / stats[..., 0])


@register
class GRPOTask:
    name = "grpo"
    config = GRPOConfig
    rows_per_sample = 1
    forward_passes = 1.0
    head = "lm"
    read_data = staticmethod(read_prompts)
    takes_images = False
    no_images_why = ("its rollout engine (megatron_swift/rollout) generates from token prompts only, so the "
                     "rollouts would not see the images")
    # Settings that decide which completions a step trains on: a resume with any of them changed is refused.
    data_keys = ("num_generations", "steps_per_generation", "max_completion_length", "temperature", "top_p",
                 "top_k", "dynamic_sampling", "max_resample")

    @classmethod
    def validate(cls, cfg, problems: List[str]) -> None:
        from megatron_swift.rewards.scoring import check_names

        task, train, par = cfg.task, cfg.train, cfg.parallel
        if task.num_generations < 2:
            problems.append(f"task.num_generations={task.num_generations}: GRPO compares completions of the same "
                            "prompt, it needs at least 2")
        elif train.global_batch_size % task.num_generations:
            problems.append(f"train.global_batch_size={train.global_batch_size} counts completions and must "
                            f"divide by task.num_generations={task.num_generations}")
        if not 0 < task.max_completion_length < train.seq_length:
            problems.append(f"task.max_completion_length={task.max_completion_length} must be in [1, "
                            f"train.seq_length={train.seq_length}) (prompt and completion share the row)")
        if task.temperature < 0 or not 0 < task.top_p <= 1 or task.top_k < 0:
            problems.append("task.temperature must be >= 0, task.top_p in (0, 1], task.top_k >= 0")
        if task.loss_type not in grpo_losses.LOSS_TYPES:
            problems.append(f"task.loss_type={task.loss_type} is not one of: {', '.join(grpo_losses.LOSS_TYPES)}")
        if task.scale_rewards not in grpo_losses.SCALE_REWARDS:
            problems.append(f"task.scale_rewards={task.scale_rewards} is not one of: "
                            f"{', '.join(grpo_losses.SCALE_REWARDS)}")
        if task.epsilon <= 0 or (task.epsilon_high is not None and task.epsilon_high <= 0):
            problems.append("task.epsilon and task.epsilon_high must be > 0")
        if task.beta < 0:
            problems.append(f"task.beta={task.beta} must be >= 0 (0: no reference model)")
        if task.max_resample < 0:
            problems.append(f"task.max_resample={task.max_resample} must be >= 0")
        if task.generation_batch_size < 0 or task.prefill_tokens < 0:
            problems.append("task.generation_batch_size and task.prefill_tokens must be >= 0 (0: no limit)")
        if task.steps_per_generation < 1:
            problems.append(f"task.steps_per_generation={task.steps_per_generation} must be >= 1")
        for key, value, why in (("parallel.cp", par.cp > 1, "context parallelism"),
                                ("parallel.sp", par.sp, "sequence parallelism"),
                                ("parallel.vpp", (par.vpp or 1) > 1, "virtual pipeline stages")):
            if value:
                problems.append(f"task=grpo does not support {why} yet ({key}): the rollout engine generates "
                                "one token at a time under the plain TP/PP/EP/DP layout")
        problems.extend(check_names(task))
        rows_from_jsonl(cfg, problems)

    def __init__(self, cfg, model, reference, source):
        self.cfg, self.task = cfg, cfg.task
        self.model, self.reference, self.source = model, reference, source
        self.eps_high = self.task.epsilon if self.task.epsilon_high is None else self.task.epsilon_high

    @staticmethod
    def reference_copies(cfg) -> int:
        """Frozen copies of the policy the run holds (the memory planner counts them): the reference, unless
        beta is 0 or LoRA's base (the policy without adapters) is the reference."""
        lora_base = cfg.tuner.name == "lora" and not cfg.task.ref_model
        return int(cfg.task.beta != 0 and not lora_base)

    @classmethod
    def build(cls, cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".", model=None):
        from megatron_swift.data.tokenizer import build_tokenizer
        from megatron_swift.models.new_tokens import add_to_tokenizer
        from megatron_swift.rewards.scoring import Scorer
        from megatron_swift.tasks.reference import build_reference

        tokenizer_spec = cfg.data.tokenizer or cfg.model.pretrained or "byte"
        tokenizer = build_tokenizer(tokenizer_spec)
        add_to_tokenizer(tokenizer, cfg.model, lambda line: None)  # model.new_tokens, as the trainer's tokenizer
        template = load_template(cfg.data.template, tokenizer_spec if tokenizer_spec != "byte" else None)
        reference = None
        if cls.reference_copies(cfg):  # from scratch: the initial weights are the reference
            reference = build_reference(cfg, backend, arch, padded_vocab, policy=model)
        engine = MegatronEngine(model, backend.torch_device, arch.vocab_size, cfg.task.generation_batch_size,
                                masks=backend.attention != "te", prefill_tokens=cfg.task.prefill_tokens)
        task = cls(cfg, model, reference, None)
        prompts = dict(datasets)["train"]
        judge = None
        if "judge" in cfg.task.rewards:
            from megatron_swift.rewards.judge_model import build_judge_generate

            judge = build_judge_generate(cfg, backend)
        scorer = Scorer(cfg.task, judge)
        if torch.distributed.get_rank() == 0:
            for line in scorer.notes:
                print(line, flush=True)
        task.source = RolloutSource(prompts, cfg, engine, tokenizer, stop_token_ids(template, tokenizer),
                                    scorer, task.logps_of, model, reference,
                                    backend.torch_device, output_dir)
        return task

    def batch_source(self, dataset):
        """The loop's batches come from rollouts, not from the prompt rows directly."""
        return self.source

    def logps_of(self, model, batches, kind=None) -> list:
        """Per-token log-probs of ``batches`` under ``model`` (None with kind 'base': the policy without its LoRA
        adapters), on the last pipeline stage; an empty list elsewhere."""
        from megatron_swift.tasks.reference import _base_of_policy

        temperature, seq, mbs = self.task.temperature, self.cfg.train.seq_length, self.cfg.train.micro_batch_size

        def run(chunks):
            return collect(chunks, batches, lambda b, chunk: chunk(b.tokens, b.position_ids, None),
                           lambda b, logits: token_logps(logits, b.labels, temperature), seq, mbs)

        if model is None:
            return _base_of_policy(self.model, run)
        with eval_mode(model):
            return run(model)

    def forward_step(self):
        def step(data_iterator, model):
            batch = next(data_iterator)
            logits = model(batch.tokens, batch.position_ids, None)
            return logits, partial(self.loss_func, batch)

        return step

    def loss_func(self, batch, logits: torch.Tensor):
        task = self.task
        logps = token_logps(logits, batch.labels, task.temperature)
        old = batch.old_logps if batch.old_logps is not None else logps.detach()
        mask = batch.loss_mask.float()
        terms = grpo_losses.token_terms(logps, old, batch.ref_logps, batch.advantages, task.epsilon,
                                        self.eps_high, task.beta, mask)
        total, count = grpo_losses.aggregate(terms["loss"], mask, task.loss_type, task.max_completion_length)
        tokens = mask.sum()
        reports = {"loss": torch.stack([total.detach(), count.detach()])}
        figures = {"clip_ratio/low": terms["clipped_low"], "clip_ratio/high": terms["clipped_high"],
                   "policy/ratio": terms["ratio"].detach()}
        if "kl" in terms:
            figures["policy/kl"] = terms["kl"].detach()
        for name, value in figures.items():
            reports[name] = torch.stack([(value * mask).sum(), tokens])
        # Entropy of the completion tokens only: the full-vocabulary softmax of just those rows.
        entropy = token_entropy(logits[batch.loss_mask.bool()], task.temperature)
        reports["policy/entropy"] = torch.stack([entropy.sum(), tokens])
        return total, count.to(torch.int), reports

    def prepare(self, batches, dataset=None) -> None:
        """Nothing: the source attached advantages and log-probs when it made the rows."""

    def evaluate(self, prompts) -> Dict[str, float]:
        """Evaluation on held-out prompts: the mean reward of greedy completions (rollout.source)."""
        return self.source.evaluate(prompts)

    def metrics(self, reports: List[dict], device) -> Dict[str, float]:
        out = reduce_reports(reports, device)
        out.update(self.source.stats)
        return out
