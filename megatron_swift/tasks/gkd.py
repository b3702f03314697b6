"""GKD: distil a frozen teacher into the model on conversation rows, with the generalised Jensen-Shannon
divergence of the two models' token distributions (training/gkd_loss.py) on the completion tokens.

Before each step's forward/backward (``prepare``): a fraction ``lmbda`` of the samples (drawn per sample
from the run seed, the step and the sample's index, so the choice does not depend on the layout) get a
completion the student writes itself, sampled at ``temperature`` through the rollout engine on the
student's own chunks (rollout.megatron_engine); with ``seq_kd`` the others get one the teacher writes
(greedy), else they keep the data's reply. Then the teacher runs the rows through megatron-core's
forward-only schedule and its logits (this rank's vocabulary shard, last pipeline stage) are attached to
the batches. The loss is the divergence summed over completion tokens and divided by their number over the
global batch (megatron-core's per-token loss contract), TRL's ``batchmean``.

The on-policy draw and the sampling generators key on the training step each micro-batch is for (the
trainer's iteration, restored with a checkpoint), so a resumed run draws and samples what the uninterrupted
one did; evaluation passes key on their own count. With ``task.teacher.tp`` other than ``parallel.tp`` the
teacher runs on process groups of its own (tasks/teacher_logits.py).

Known limits of this version: sampled completions depend on how rows are grouped into micro-batches, so on-policy runs are not
comparable number for number across layouts (off-policy ones are); the teacher's logits of a step's
micro-batches are held at once ([rows, seq, vocabulary shard] each).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, List

import numpy as np
import torch
from megatron.core import parallel_state as ps

from megatron_swift.tasks.base import register
from megatron_swift.tasks.configs import GKDConfig
from megatron_swift.tasks.reports import reduce_reports
from megatron_swift.tasks.teacher import (build_teacher, teacher_folder_problem, teacher_layout_problems,
                                          tokenizer_problem)
from megatron_swift.training.forward_only import collect, eval_mode
from megatron_swift.training.gkd_loss import generalized_jsd


def _logits(batch, model):
    return model(batch.tokens, batch.position_ids, attention_mask=None)  # [rows, seq, vocab shard]


@register
class GKDTask:
    name = "gkd"
    config = GKDConfig
    rows_per_sample = 1
    forward_passes = 4 / 3  # the student's forward+backward (3 units) and the teacher's forward (1)
    head = "lm"
    read_data = None  # conversation rows from data.source (data=sft)
    takes_images = False
    no_images_why = ("its teacher and its on-policy generation (megatron_swift/rollout) take token rows only, "
                     "so neither would see the images")

    def __init__(self, cfg, teacher, student, engines, pad_id: int, stops: List[int], own_layout=None):
        self.cfg, self.task = cfg, cfg.task
        self.teacher, self.student = teacher, student
        self.engines = engines  # {"student": MegatronEngine, "teacher": MegatronEngine} as needed
        self.pad_id, self.stops = pad_id, stops
        self.own_layout = own_layout  # tasks.teacher_logits.TeacherOnOwnLayout, or None: the student's layout
        self.evaluations = 0  # evaluation passes so far (their draws key on it; training's on the step)

    @classmethod
    def validate(cls, cfg, problems: List[str]) -> None:
        task, par = cfg.task, cfg.parallel
        folder = teacher_folder_problem(task.teacher.model)
        if folder:
            problems.append(folder)
        if not folder:
            problems += teacher_layout_problems(cfg)
        if not 0 <= task.lmbda <= 1:
            problems.append(f"task.lmbda={task.lmbda} must be in [0, 1]")
        if not 0 <= task.beta <= 1:
            problems.append(f"task.beta={task.beta} must be in [0, 1]")
        if task.temperature <= 0:
            problems.append(f"task.temperature={task.temperature} must be > 0")
        if cfg.data.source != "sft" or cfg.data.packing or cfg.data.streaming:
            problems.append("task=gkd reads conversation rows (data=sft) without data.packing or data.streaming")
        if par.cp > 1:
            problems.append("task=gkd does not support parallel.cp > 1 yet (its completions are written per row)")
        if not folder:
            mismatch = tokenizer_problem(cfg)
            if mismatch:
                problems.append(mismatch)

    @staticmethod
    def frozen_model(cfg):
        """The teacher, for the memory planner (plan.memory.FrozenModel): its architecture and layout (None
        without task.teacher.model: training refuses that config)."""
        from megatron_swift.models.frozen import arch_from_folder
        from megatron_swift.plan.memory import FrozenModel

        if teacher_folder_problem(cfg.task.teacher.model):
            return None
        return FrozenModel(arch_from_folder(cfg.task.teacher.model), cfg.task.teacher.tp,
                           cfg.model.make_vocab_size_divisible_by)

    @classmethod
    def build(cls, cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".", model=None):
        from megatron_swift.data.prompts import stop_token_ids
        from megatron_swift.data.templates import load_template
        from megatron_swift.data.tokenizer import build_tokenizer
        from megatron_swift.rollout.megatron_engine import MegatronEngine

        spec = cfg.data.tokenizer or cfg.model.pretrained or "byte"
        tokenizer = build_tokenizer(spec)
        template = load_template(cfg.data.template, spec if spec != "byte" else None)
        teacher, layout, teacher_padded = build_teacher(cfg, backend, arch, padded_vocab)
        own = None
        if layout is not None:
            from megatron_swift.tasks.teacher_logits import TeacherOnOwnLayout

            own = TeacherOnOwnLayout(teacher, layout, arch.vocab_size, padded_vocab, teacher_padded, _logits)
        masks = backend.attention != "te"
        engines = {}
        if cfg.task.lmbda > 0:
            engines["student"] = MegatronEngine(model, backend.torch_device, arch.vocab_size, masks=masks)
        if cfg.task.seq_kd and cfg.task.lmbda < 1:
            engines["teacher"] = MegatronEngine(teacher, backend.torch_device, arch.vocab_size, masks=masks)
        return cls(cfg, teacher, model, engines, tokenizer.pad, stop_token_ids(template, tokenizer), own)

    # -- before the step ------------------------------------------------------------------------------

    def prepare(self, batches, dataset=None) -> None:
        """Student (and with seq_kd teacher) completions where drawn, then the teacher's logits of the rows."""
        if batches and batches[0].step is None:
            self.evaluations += 1
        if self.engines:
            for k, batch in enumerate(batches):
                self._rewrite(batch, k)
        if self.own_layout is not None:
            logits = self.own_layout.logits(batches, self.cfg.train.seq_length, self.cfg.train.micro_batch_size)
        else:
            logits = collect(self.teacher, batches, _logits, lambda batch, out: out.detach(),
                             self.cfg.train.seq_length, self.cfg.train.micro_batch_size)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for batch, out in zip(batches, logits):
                batch.teacher_logits = out

    def _draw_key(self, batch) -> List[int]:
        """Seed of a micro-batch's draws: the run seed and the training step it is for (the trainer's iteration,
        restored on resume), or the evaluation pass."""
        if batch.step is not None:
            return [self.cfg.train.seed, 0, int(batch.step)]
        return [self.cfg.train.seed, 1, self.evaluations]

    def _on_policy(self, batch) -> List[bool]:
        """Per row: whether the student writes its completion (a draw from the seed, step and sample index)."""
        ids = batch.sample_ids.tolist() if batch.sample_ids is not None else range(batch.tokens.shape[0])
        draws = [np.random.default_rng([*self._draw_key(batch), int(i)]).random() for i in ids]
        return [u < self.task.lmbda for u in draws]

    def _rewrite(self, batch, k: int) -> None:
        from megatron_swift.data.sft import fill_row
        from megatron_swift.rollout.sampling import SamplingParams

        student = self._on_policy(batch)
        groups = {"student": [i for i, s in enumerate(student) if s],
                  "teacher": [i for i, s in enumerate(student) if not s]}
        for n, (who, rows) in enumerate(groups.items()):
            engine = self.engines.get(who)
            if engine is None or not rows:
                continue
            prompts = [self._prompt(batch, i) for i in rows]
            # one generator per micro-batch and writer, the same on every rank of the model-parallel group
            generator = torch.Generator(device=batch.tokens.device)
            generator.manual_seed(int(np.random.default_rng([*self._draw_key(batch), k, n])
                                      .integers(2**62)))
            params = SamplingParams(max_new_tokens=self.task.max_new_tokens,
                                    temperature=self.task.temperature if who == "student" else 0,
                                    stop_token_ids=self.stops)
            model = self.student if who == "student" else self.teacher
            with torch.no_grad(), eval_mode(model):
                out = engine.generate(prompts, params, generator)
            seq = batch.tokens.shape[1]
            for i, prompt, completion in zip(rows, prompts, out.token_ids):
                ids = (prompt + completion)[:seq]
                row = fill_row([(np.array(ids), np.array([0] * len(prompt) + [1] * (len(ids) - len(prompt))))],
                               seq, self.pad_id)
                batch.tokens[i] = torch.from_numpy(row["tokens"]).to(batch.tokens)
                batch.labels[i] = torch.from_numpy(row["labels"]).to(batch.labels)
                batch.loss_mask[i] = torch.from_numpy(row["loss_mask"]).to(batch.loss_mask)
                batch.position_ids[i] = torch.from_numpy(row["positions"]).to(batch.position_ids)

    @staticmethod
    def _prompt(batch, i: int) -> List[int]:
        """The row's tokens before its first loss-carrying token (the prompt, up to the assistant's turn)."""
        marked = torch.nonzero(batch.loss_mask[i] > 0)
        first = int(marked[0]) + 1 if len(marked) else int(batch.lengths[i])
        return batch.tokens[i, :first].tolist()

    # -- the step ---------------------------------------------------------------------------------------

    def forward_step(self):
        def step(data_iterator, model):
            batch = next(data_iterator)
            return _logits(batch, model), partial(self.loss_func, batch)

        return step

    def loss_func(self, batch, logits: torch.Tensor):
        """Divergence summed over completion tokens, their count, and [sum, count] reports."""
        per_token = generalized_jsd(logits, batch.teacher_logits, self.task.beta, self.task.temperature,
                                    group=ps.get_tensor_model_parallel_group())
        mask = batch.loss_mask.float()
        total = (per_token * mask).sum()
        tokens = mask.sum()
        rows = torch.tensor(float(mask.shape[0]), device=mask.device)
        on_policy = torch.tensor(float(sum(self._on_policy(batch))) if self.engines.get("student") else 0.0,
                                 device=mask.device)
        report = {"loss": torch.stack([total.detach(), tokens]), "on_policy": torch.stack([on_policy, rows])}
        return total, tokens.to(torch.int), report

    def metrics(self, reports: List[dict], device) -> Dict[str, float]:
        return reduce_reports(reports, device)
