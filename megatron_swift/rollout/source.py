"""On-policy rollouts as a batch source: the loop asks for step i's micro-batches, this source makes them.

Every ``steps_per_generation`` steps it draws the next prompts, has the policy write ``num_generations``
completions of each (rollout engine), scores them (rewards.scoring), turns rewards into group advantages
over the whole global batch, computes the log-probabilities the loss compares against (the policy's at
generation time when it takes several steps per generation; the frozen reference's when beta > 0), and
cuts the rows into micro-batches for the steps to come.

Which prompts: generation g takes prompts [g*P, (g+1)*P) of the epoch's permutation of the prompt rows
(re-drawn each epoch from train.seed + epoch, as data.sampler does), P = global batch * steps per generation
/ num_generations. Completion slot j belongs to prompt j // num_generations; data-parallel rank r writes
the contiguous slots [r*n, (r+1)*n). Sampling draws from a generator seeded by (train.seed, g, DP rank), so
a resumed run draws what the uninterrupted one would have; the rows not yet trained on are saved with each
checkpoint (``state``), since the weights that wrote them are gone after the step.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_swift.data.sampler import Batch
from megatron_swift.rewards.registry import RewardError
from megatron_swift.rollout.sampling import SamplingParams
from megatron_swift.training import grpo_losses

_BATCH_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "lengths", "advantages", "old_logps", "ref_logps")
_SEQUENCE_FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "old_logps", "ref_logps")
_TRIM_MULTIPLE = 16  # rows are cut to the micro-batch's longest, rounded up to this


class RolloutSource:
    def __init__(self, prompts, cfg, engine, tokenizer, stop_ids: List[int], scorer, token_logps,
                 policy, reference, device, output_dir: str):
        self.prompts, self.cfg, self.task = prompts, cfg, cfg.task
        self.engine, self.tokenizer, self.stop_ids, self.scorer = engine, tokenizer, set(stop_ids), scorer
        self.token_logps = token_logps  # (model chunks, batches) -> per-token log-probs on the last stage
        self.policy, self.reference = policy, reference  # reference None: beta 0, or LoRA's base (see task)
        self.device, self.output_dir = device, output_dir
        self.description = prompts.description
        dp = ps.get_data_parallel_world_size()
        self.per_step = cfg.train.global_batch_size // dp  # rows of this rank per step
        self.spg = self.task.steps_per_generation
        self.prompts_per_generation = cfg.train.global_batch_size * self.spg // self.task.num_generations
        self.generations_per_epoch = len(prompts.ids) // self.prompts_per_generation
        self.buffer: List[dict] = []  # rows of the current generation for the steps to come
        self.generation = -1
        self.stats: Dict[str, float] = {}
        self.samples: List[dict] = []  # the last generation's logged completions (for a WandB table)
        self.generate_seconds, self.generated_tokens = 0.0, 0  # in the rollout engine, this generation
        self.cursor = 0  # prompts of the stream used so far (moves faster than the steps with dynamic sampling)

    # ---------------------------------------------------------------------------------- the loop's side

    def microbatches(self, iteration: int) -> List[Batch]:
        generation, k = divmod(iteration, self.spg)
        if generation != self.generation:
            self._generate(generation)
        mbs = self.cfg.train.micro_batch_size
        rows = self.buffer[k * self.per_step:(k + 1) * self.per_step]
        return [self._collate(rows[i:i + mbs]) for i in range(0, len(rows), mbs)]

    def _collate(self, rows: List[dict]) -> Batch:
        # Without pipeline stages (whose messages have the size of train.seq_length) a micro-batch is cut to
        # its longest row: a short completion in a long train.seq_length costs no compute.
        trim = ps.get_pipeline_model_parallel_world_size() == 1
        return _collate(rows, self.device, trim)

    def take_samples(self) -> List[dict]:
        """The completions logged since the last call (the loop shows them as a table)."""
        samples, self.samples = self.samples, []
        return samples

    def state(self) -> dict:
        """What a checkpoint keeps: the generation in use and its rows (every step of it may still come)."""
        return {"generation": self.generation, "cursor": self.cursor,
                "rows": [{k: v for k, v in row.items()} for row in self.buffer], "stats": dict(self.stats)}

    def restore(self, state: dict) -> None:
        self.generation, self.cursor = state["generation"], state["cursor"]
        self.buffer = list(state["rows"])
        self.stats = dict(state["stats"])

    def evaluate(self, rows) -> Dict[str, float]:
        """Greedy completions of every held-out prompt (``rows``: data.eval_path), scored: the mean reward, each
        function's, and the mean length. DP rank r takes prompts r, r+dp, ...; every rank gets as many
        (repeating its last, not counted) so that all run the same forwards."""
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = list(range(rank, len(rows.ids), dp))
        real = len(mine)
        mine += [mine[-1] if mine else 0] * (-(-len(rows.ids) // dp) - real)
        params = SamplingParams(max_new_tokens=self.task.max_completion_length, temperature=0,
                                stop_token_ids=sorted(self.stop_ids))
        out = self.engine.generate([rows.ids[i] for i in mine], params)
        texts = [self.tokenizer.decode([t for t in ids if t not in self.stop_ids]) for ids in out.token_ids]
        rewards, per_function, _ = self._score(rows, mine, texts, out.token_ids)
        lengths = torch.tensor([float(len(ids)) for ids in out.token_ids])
        values = [rewards, lengths, *per_function.values()]
        sums = torch.stack([v[:real].double().sum() for v in values] + [torch.tensor(float(real))]).to(self.device)
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
        count = float(sums[-1])
        names = ["reward", "completion_length", *[f"rewards/{name}" for name in per_function]]
        return {name: float(sums[k]) / count for k, name in enumerate(names)}

    # ---------------------------------------------------------------------------------- one generation

    def _prompts_at(self, cursor: int) -> List[int]:
        """The prompts of one generation from position ``cursor`` of the prompt stream: each epoch a permutation
        (train.seed + epoch) of the rows, cut to a whole number of generations."""
        per_epoch = self.generations_per_epoch * self.prompts_per_generation
        epoch, start = divmod(cursor, per_epoch)
        order = torch.randperm(len(self.prompts.ids), generator=torch.Generator().manual_seed(
            self.cfg.train.seed + epoch)) if self.cfg.data.shuffle else torch.arange(len(self.prompts.ids))
        return order[start:start + self.prompts_per_generation].tolist()

    def _generate(self, generation: int) -> None:
        P, G = self.prompts_per_generation, self.task.num_generations
        self.generate_seconds, self.generated_tokens = 0.0, 0
        if not self.task.dynamic_sampling:
            self.cursor = generation * P  # the position follows from the step
            mine = self._rollout(self._prompts_at(self.cursor), generation, 0)
            self.cursor += P
            self._finish(generation, mine, _gather_dp(mine.rewards, self.device), {})
            return
        # Dynamic sampling (DAPO): groups whose completions all got the same reward teach nothing; draw more
        # prompts, up to task.max_resample times, then fill with such groups (advantage 0) if still short.
        kept, flat, attempts, errors = [], [], 0, {}
        for attempt in range(self.task.max_resample + 1):
            attempts += 1
            local = self._rollout(self._prompts_at(self.cursor), generation, attempt)
            self.cursor += P
            errors = {k: errors.get(k, 0) + v for k, v in local.errors.items()}  # this rank's, for the metrics
            for group in _gather_groups(local, G):
                (flat if group.rewards.max() == group.rewards.min() else kept).append(group)
            if len(kept) >= P:
                break
        chosen = Rollouts.concat((kept + flat)[:P])
        rank, n = ps.get_data_parallel_rank(), P * G // ps.get_data_parallel_world_size()
        mine = chosen.slice(rank * n, (rank + 1) * n)
        mine.errors = errors
        self._finish(generation, mine, chosen.rewards,
                     {"dynamic/kept_groups": min(len(kept), P) / P, "dynamic/attempts": attempts})

    def _rollout(self, prompts: List[int], generation: int, attempt: int) -> "Rollouts":
        """This DP rank's slots of ``prompts`` x num_generations: completions and their rewards."""
        task, dp, rank = self.task, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        n = len(prompts) * task.num_generations // dp
        mine = [prompts[j // task.num_generations] for j in range(rank * n, (rank + 1) * n)]
        # Seeded by (seed, generation, round, DP rank): a resumed run draws what the uninterrupted one did.
        seed = hash((self.cfg.train.seed, generation, attempt, rank)) & (2 ** 63 - 1)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        params = SamplingParams(max_new_tokens=task.max_completion_length, temperature=task.temperature,
                                top_p=task.top_p, top_k=task.top_k, stop_token_ids=sorted(self.stop_ids))
        start = time.perf_counter()
        out = self.engine.generate([self.prompts.ids[i] for i in mine], params, generator)
        self.generate_seconds += time.perf_counter() - start
        self.generated_tokens += sum(len(ids) for ids in out.token_ids)
        texts = [self.tokenizer.decode([t for t in ids if t not in self.stop_ids]) for ids in out.token_ids]
        rewards, per_function, errors = self._score(self.prompts, mine, texts, out.token_ids)
        judge = self.scorer.functions.get("judge")
        replies = list(judge.last_replies) if judge is not None else [None] * len(mine)
        return Rollouts(mine, out.token_ids, out.stopped, texts, rewards, per_function, errors, replies)

    def _finish(self, generation: int, mine: "Rollouts", everyone: torch.Tensor, extra: Dict[str, float]) -> None:
        """Advantages over the whole global batch (``everyone``: its rewards in slot order), rows, log-probs."""
        rank, n = ps.get_data_parallel_rank(), len(mine.prompts)
        advantages = grpo_losses.advantages(everyone, self.task.num_generations, self.task.scale_rewards)
        local = advantages[rank * n:(rank + 1) * n]
        rows = [self._row(self.prompts.ids[i], ids, float(a)) for i, ids, a in zip(mine.prompts, mine.token_ids, local)]
        self._attach_logps(rows)
        self.buffer, self.generation = rows, generation
        self.stats = dict(self._stats(everyone, mine, advantages), **extra)
        self._log_samples(generation, mine, local)

    def _score(self, rows, mine: List[int], texts: List[str], token_ids) -> tuple:
        """(rewards [n], {name: [n]}, {name: errors}) on every rank. A reward runs on one rank per model-parallel
        group and is shared, except a collective one (the judge: a model under this layout), run by all."""
        group = ps.get_model_parallel_group()
        src = dist.get_global_rank(group, 0)
        names = list(self.scorer.functions)
        local = [name for name in names if name not in self.scorer.collective]
        prompts = [rows.messages[i] for i in mine]
        columns = _columns([rows.columns[i] for i in mine])
        columns["completion_lengths"] = [len(ids) for ids in token_ids]
        # One row per local reward: its values, then its error count.
        table = torch.zeros(len(local), len(mine) + 1, dtype=torch.float64)
        if dist.get_rank() == src and local:
            for k, result in enumerate(self._scored(rows, prompts, texts, columns, local, mine).values()):
                table[k, :-1] = torch.tensor(list(result), dtype=torch.float64)
                table[k, -1] = result.errors
        if dist.get_world_size(group) > 1 and local:
            table = table.to(self.device)
            dist.broadcast(table, src=src, group=group)
            table = table.cpu()
        results = {name: list(table[k, :-1].tolist()) for k, name in enumerate(local)}
        errors = {name: int(table[k, -1]) for k, name in enumerate(local)}
        collective = [name for name in names if name in self.scorer.collective]
        for name, result in self._scored(rows, prompts, texts, columns, collective, mine).items():
            results[name], errors[name] = list(result), result.errors
        total = torch.tensor(self.scorer.total(results), dtype=torch.float32)
        return total, {name: torch.tensor(results[name], dtype=torch.float32) for name in names}, errors

    def _scored(self, rows, prompts, texts, columns, names, mine: List[int]) -> dict:
        """The scorer's results; a failing reward function is named with the prompt row's file:line."""
        try:
            return self.scorer.score(prompts, texts, columns, names)
        except RewardError as e:
            if e.row is None:
                raise
            raise RewardError(f"{rows.where[mine[e.row]]}: {e}", row=e.row) from None

    def _row(self, prompt: List[int], completion: List[int], advantage: float) -> dict:
        seq = self.cfg.train.seq_length
        ids = (prompt + completion)[:seq]
        tokens = torch.full((seq,), self.tokenizer.pad if hasattr(self.tokenizer, "pad") else 0, dtype=torch.long)
        tokens[:len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels = torch.roll(tokens, -1)
        loss_mask = torch.zeros(seq)
        # Position t predicts token t+1: the completion's tokens are predicted from len(prompt)-1 on.
        loss_mask[len(prompt) - 1:len(ids) - 1] = 1
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": torch.arange(seq),
                "lengths": torch.tensor(len(ids)), "advantages": torch.tensor(advantage)}

    def _attach_logps(self, rows: List[dict]) -> None:
        """The policy's (several steps per generation) and the reference's (beta > 0) per-token log-probs."""
        mbs = self.cfg.train.micro_batch_size
        needs = [("old_logps", self.policy, None)] if self.spg > 1 else []
        if self.task.beta != 0:
            needs.append(("ref_logps", self.reference, "base"))
        for name, model, kind in needs:
            batches = [self._collate(rows[i:i + mbs]) for i in range(0, len(rows), mbs)]
            values = self.token_logps(model, batches, kind)
            seq = self.cfg.train.seq_length
            # On the last pipeline stage (where the loss reads them); kept at full length like the rows.
            for k, part in enumerate(values):
                for j, v in enumerate(part.cpu()):
                    rows[k * mbs + j][name] = torch.nn.functional.pad(v, (0, seq - v.shape[0]))

    def _stats(self, everyone: torch.Tensor, mine: "Rollouts", advantages) -> dict:
        lengths = torch.tensor([len(ids) for ids in mine.token_ids], dtype=torch.float64)
        clipped = torch.tensor([not s for s in mine.stopped], dtype=torch.float64)
        malformed = self.scorer.judge_malformed()
        names = list(mine.per_function)
        sums = torch.stack([lengths.sum(), clipped.sum(), torch.tensor(float(len(lengths))),
                            *[mine.per_function[name].double().sum() for name in names],
                            *[torch.tensor(float(mine.errors.get(name, 0))) for name in names],
                            torch.tensor(float(malformed or 0) * len(lengths)),
                            torch.tensor(float(self.generated_tokens))]).to(self.device)
        top = torch.stack([lengths.max(), torch.tensor(self.generate_seconds, dtype=torch.float64)]).to(self.device)
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        count = float(sums[2])
        stats = {"rewards/mean": everyone.mean().item(), "rewards/std": everyone.std().item(),
                 "advantages/std": advantages.std().item(), "advantages/max_abs": advantages.abs().max().item(),
                 "completions/mean_length": float(sums[0]) / count, "completions/max_length": float(top[0]),
                 "completions/clipped_ratio": float(sums[1]) / count,
                 # Time in the rollout engine (the slowest DP rank) and every token it wrote, all ranks.
                 "rollout/seconds": float(top[1]), "rollout/tokens_per_s": float(sums[-1]) / max(float(top[1]), 1e-9)}
        for k, name in enumerate(names):
            stats[f"rewards/{name}"] = float(sums[3 + k]) / count
            if float(sums[3 + len(names) + k]):
                stats[f"rewards/{name}/errors"] = float(sums[3 + len(names) + k])
        if malformed is not None:  # replies of the judge with no score in them (scored 0)
            stats["judge/malformed"] = float(sums[-2]) / count
        return stats

    def _log_samples(self, generation: int, mine: "Rollouts", advantages) -> None:
        """A few completions with their rewards, appended to <run>/completions.jsonl and kept for the WandB table
        (``take_samples``), on the last rank (the one that logs; it holds the last DP rank's completions)."""
        keep = self.task.log_completions
        self.samples = []
        if keep <= 0 or dist.get_rank() != dist.get_world_size() - 1:
            return
        for j in range(min(keep, len(mine.prompts))):
            sample = {"generation": generation, "step": generation * self.spg + 1,
                      "prompt": self.prompts.messages[mine.prompts[j]], "completion": mine.texts[j],
                      "completion_tokens": len(mine.token_ids[j]), "reward": float(mine.rewards[j]),
                      "advantage": float(advantages[j]),
                      **{f"rewards/{k}": float(v[j]) for k, v in mine.per_function.items()}}
            if mine.replies[j] is not None:
                sample["judge_reply"] = mine.replies[j]
                # cut off at task.judge.max_new_tokens: never read as a score (rewards/judge.py)
                sample["judge_truncated"] = bool(getattr(mine.replies[j], "truncated", False))
            self.samples.append(sample)
        with open(os.path.join(self.output_dir, "completions.jsonl"), "a", encoding="utf-8") as f:
            for sample in self.samples:
                f.write(json.dumps(sample) + "\n")


@dataclass
class Rollouts:
    """Completions of some slots (prompt row index per slot) with their rewards."""

    prompts: List[int]
    token_ids: List[List[int]]
    stopped: List[bool]
    texts: List[str]
    rewards: torch.Tensor
    per_function: Dict[str, torch.Tensor]
    errors: Dict[str, int]
    replies: List[Optional[str]]

    def slice(self, a: int, b: int) -> "Rollouts":
        return Rollouts(self.prompts[a:b], self.token_ids[a:b], self.stopped[a:b], self.texts[a:b], self.rewards[a:b],
                        {k: v[a:b] for k, v in self.per_function.items()}, dict(self.errors), self.replies[a:b])

    @staticmethod
    def concat(parts: List["Rollouts"]) -> "Rollouts":
        return Rollouts([p for r in parts for p in r.prompts], [t for r in parts for t in r.token_ids],
                        [s for r in parts for s in r.stopped], [t for r in parts for t in r.texts],
                        torch.cat([r.rewards for r in parts]),
                        {k: torch.cat([r.per_function[k] for r in parts]) for k in parts[0].per_function},
                        {k: sum(r.errors.get(k, 0) for r in parts) for k in parts[0].errors},
                        [x for r in parts for x in r.replies])


def _gather_groups(local: Rollouts, group_size: int) -> List[Rollouts]:
    """Every DP rank's rollouts, in slot order, cut into groups of one prompt each (same on every rank)."""
    group = ps.get_data_parallel_group()
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    everyone = Rollouts.concat(parts)
    return [everyone.slice(k, k + group_size) for k in range(0, len(everyone.prompts), group_size)]


def _columns(rows: List[dict]) -> Dict[str, list]:
    """Row dicts -> one list per column name (None where a row lacks it)."""
    names = sorted({k for row in rows for k in row})
    return {name: [row.get(name) for row in rows] for name in names}


def _gather_dp(values: torch.Tensor, device) -> torch.Tensor:
    """This rank's values -> every data-parallel rank's, in rank order (on the device the backend talks on)."""
    group = ps.get_data_parallel_group()
    if dist.get_world_size(group) == 1:
        return values
    parts = [torch.empty_like(values, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, values.to(device), group=group)
    return torch.cat(parts).cpu()


def _collate(rows: List[dict], device, trim: bool = False) -> Batch:
    stacked = {name: torch.stack([row[name] for row in rows]) for name in _BATCH_FIELDS if name in rows[0]}
    if trim:
        longest = int(stacked["lengths"].max())
        length = min(-(-longest // _TRIM_MULTIPLE) * _TRIM_MULTIPLE, stacked["tokens"].shape[1])
        for name in _SEQUENCE_FIELDS:
            if name in stacked:
                stacked[name] = stacked[name][:, :length].contiguous()
    return Batch(**stacked).to(device)
