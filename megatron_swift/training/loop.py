"""The training loop: set up a run from its config, then step, log, evaluate and checkpoint.

Read top to bottom: ``run`` validates and sets up (nothing heavy happens
before validation passes), ``Trainer.fit`` is the loop.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.utils import get_model_config
from omegaconf import OmegaConf

from megatron_swift import backend as backend_mod
from megatron_swift.config.validate import ConfigError, validate
from megatron_swift.convert.hf_load import load_composed_weights, load_hf_weights
from megatron_swift.data.images import vision_data
from megatron_swift.data.sampler import Batch, DataParallelSampler
from megatron_swift.data.sources import build_source
from megatron_swift.data.tokenizer import build_tokenizer
from megatron_swift.models import new_tokens, unloaded
from megatron_swift.models.arch import padded_vocab_size
from megatron_swift.models.builder import build_model, transformer_config
from megatron_swift.models.vlm import add_image_token
from megatron_swift.observe import Sinks
from megatron_swift.observe.progress import Progress
from megatron_swift.tasks import build_task, task_class
from megatron_swift.tasks.reports import moe_aux_loss
from megatron_swift.tuners.apply import apply_tuner
from megatron_swift.training import checkpoint as ckpt
from megatron_swift.training import cp_shard, resume_check, run_dir, run_index, run_length
from megatron_swift.training.errors import Diverged
from megatron_swift.training.flops import flops_per_step
from megatron_swift.training.guard import StepGuard
from megatron_swift.training.optim import build_optimizer, build_scheduler, wrap_model
from megatron_swift.training.stop import StopRequests


def _seed(seed: int) -> None:
    # Megatron-LM's convention: each pipeline stage draws different initial weights.
    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _log_rank() -> bool:
    # The last rank is on the last pipeline stage, where the loss is.
    return dist.get_rank() == dist.get_world_size() - 1


def _run_lr(groups) -> float:
    """The run's lr (train.lr's schedule), not a part's with its own (train.vision_lr / projector_lr): megatron-core's
    first group without an lr override, or the first group when every trained parameter has one."""
    from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

    lr = get_canonical_lr_for_logging(groups)
    return groups[0]["lr"] if lr is None else lr


def _print0(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


@dataclass
class Trainer:
    cfg: object
    backend: object
    arch: object
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    train_data: object
    eval_data: Optional[object]
    sampler: DataParallelSampler
    length: run_length.RunLength
    output_dir: str
    flops_per_step: float
    state: ckpt.TrainState
    model_meta: dict
    task: object = None  # megatron_swift.tasks: forward step, per-step preparation, metrics
    sinks: Optional[Sinks] = None
    stopped: Optional[str] = None  # why the run stopped before its end (a signal, the time budget)
    guard: Optional[StepGuard] = None  # skips steps with a non-finite loss or gradient norm
    stops: Optional[StopRequests] = None  # SIGTERM/SIGINT/SIGUSR1 and the wall-clock budget
    run_meta: Optional[dict] = None  # settings and planned length stored with each checkpoint (resume_check)
    resumed_from: Optional[str] = None  # the checkpoint this run continued from (outputs/runs.jsonl)

    def _microbatches(self, dataset, sampler, iteration: int) -> List[Batch]:
        device = self.backend.torch_device
        if hasattr(dataset, "microbatches"):  # a batch source of its own (a task's rollouts)
            return dataset.microbatches(iteration)
        if _streaming(dataset):  # rows come in order from this rank's stream
            mbs = self.cfg.train.micro_batch_size
            rows = dataset.next_rows(sampler.num_microbatches * mbs)
            return [cp_shard.shard(dataset.collate(rows[k:k + mbs]).to(device)) for k in range(0, len(rows), mbs)]
        batches = []
        for indices in sampler.microbatch_indices(iteration):
            batch = dataset.collate([dataset[int(i)] for i in indices])
            batch.sample_ids = indices
            batches.append(cp_shard.shard(batch.to(device)))
        return batches

    def _forward_backward(self, batches: List[Batch], forward_only: bool, dataset=None):
        # One iterator per model chunk: each virtual stage walks the same micro-batches.
        self.task.prepare(batches, dataset)
        iterators = [iter(batches) for _ in self.model]
        return get_forward_backward_func()(
            forward_step_func=self.task.forward_step(),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model,
            num_microbatches=len(batches),
            seq_length=self.cfg.train.seq_length,
            micro_batch_size=self.task.rows_per_sample * self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def _task_metrics(self, reports) -> Optional[Dict[str, float]]:
        """The task's global-batch figures ("loss" first of all); None off the last pipeline stage."""
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        return self.task.metrics(reports, self.backend.torch_device)

    def train_step(self, iteration: int):
        """One optimizer step over the global batch; returns (task metrics or None, grad norm, lr, why the
        update was skipped or None)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = _run_lr(self.optimizer.param_groups)  # the rate this step uses
        batches = self._microbatches(self.train_data, self.sampler, iteration)
        for batch in batches:
            batch.step = iteration  # restored with the checkpoint: per-step draws continue on resume
        reports = self._forward_backward(batches, False, self.train_data)
        figures = self._task_metrics(reports)  # before the update: the guard needs the loss
        aux = moe_aux_loss(get_model_config(self.model[0]), len(batches), self.backend.torch_device)
        if figures is not None:  # the router's load-balancing loss, on its own (every stage took part)
            figures.update(aux)
        self.guard.observe_loss(figures["loss"] if figures else None, self.backend.torch_device)
        ok, grad_norm, _ = self.optimizer.step()
        skipped = self.guard.end_step(fp16_skipped=not ok)
        if skipped is None:
            self.scheduler.step(increment=1)
        return figures, grad_norm, lr, skipped

    def evaluate(self) -> Optional[Dict[str, float]]:
        """Figures on data.eval_path (the loss; a task with its own ``evaluate``, e.g. GRPO's mean reward of
        greedy completions, gives its own); None off the rank that has them."""
        if hasattr(self.task, "evaluate"):
            return self.task.evaluate(self.eval_data)
        sampler = DataParallelSampler(len(self.eval_data), self.cfg.train.global_batch_size,
                                      self.cfg.train.micro_batch_size, ps.get_data_parallel_world_size(),
                                      ps.get_data_parallel_rank(), seed=0, shuffle=False)
        steps = min(self.cfg.train.eval_iters, sampler.steps_per_epoch)
        for chunk in self.model:
            chunk.eval()
        reports = []
        with torch.no_grad():
            for i in range(steps):
                reports += self._forward_backward(self._microbatches(self.eval_data, sampler, i), True,
                                                  self.eval_data) or []
        for chunk in self.model:
            chunk.train()
        figures = self._task_metrics(reports)
        return {"loss": figures["loss"]} if figures else None

    def _metrics(self, figures: Optional[Dict[str, float]], grad_norm, lr: float, step_time: float) -> dict:
        train, task = self.cfg.train, self.task
        world = dist.get_world_size()
        # A preference task runs 2 rows per sample, and a reference forward on top of the policy's.
        tflops = self.flops_per_step * task.rows_per_sample * task.forward_passes / step_time / world / 1e12
        peak = self.backend.peak_tflops()
        figures = dict(figures or {})
        return {
            "iteration": self.state.iteration,
            "epoch": self.state.iteration / self.length.steps_per_epoch,
            "consumed_samples": self.state.consumed_samples,
            "loss": figures.pop("loss", None),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped_steps": self.guard.total_skipped,
            "loss_scale": float(self.optimizer.get_loss_scale()) if train.precision == "fp16" else None,
            "step_time_s": step_time,
            "tokens_per_s": train.global_batch_size * task.rows_per_sample * train.seq_length / step_time,
            "tflops_per_device": tflops,
            "mfu": tflops / peak if peak else None,
            "memory_gib": self.backend.memory_gib(),
            **figures,
        }

    def _save(self) -> str:
        path = ckpt.save(self.output_dir, self.state, self.model, self.optimizer, self.scheduler,
                         OmegaConf.to_yaml(self.cfg), self.cfg.train.keep_last, self.model_meta,
                         self.train_data if _stateful(self.train_data) else None,
                         adapter_only=self.cfg.tuner.name == "lora",
                         run_meta=dict(self.run_meta, guard=self.guard.state()),
                         timeout_s=60.0 * self.cfg.cluster.dist_timeout_minutes)
        _print0(f"saved checkpoint {path}")
        return path

    def _should_save(self, done: int) -> bool:
        train = self.cfg.train
        return bool(
            (train.save_interval and done % train.save_interval == 0)
            or (train.save_at_epoch_end and self.length.ends_epoch(done))
        )

    def step(self) -> Optional[str]:
        """One whole step as the loop runs it: train, count, log, evaluate, checkpoint; returns why the run
        must stop now (a signal, the time budget) or None."""
        train = self.cfg.train
        start = time.perf_counter()
        figures, grad_norm, lr, skipped = self.train_step(self.state.iteration)
        self.backend.synchronize()
        step_time = time.perf_counter() - start
        self.state.iteration += 1
        self.state.consumed_samples += train.global_batch_size
        self.state.epoch = self.state.iteration // self.length.steps_per_epoch
        if (self.state.iteration % self.cfg.logging.log_interval == 0 or skipped
                or self.state.iteration == self.length.total_iters):
            metrics = self._metrics(figures, grad_norm, lr, step_time)
            metrics["skipped"] = skipped is not None
            metrics["skip_reason"] = skipped
            self.sinks.log(metrics)
        if hasattr(self.train_data, "take_samples"):  # a source that shows example outputs (rollouts)
            self.sinks.log_samples(self.state.iteration, self.train_data.take_samples())
        self.guard.check(self.state.iteration, self._checkpoint_at_or_before)
        if train.eval_interval and self.eval_data is not None and self.state.iteration % train.eval_interval == 0:
            figures = self.evaluate()
            if figures is not None:
                self.sinks.log_eval(self.state.iteration, figures)
        if self.length.ends_epoch(self.state.iteration):
            _print0(f"epoch {self.state.epoch} done at step {self.state.iteration} "
                    f"({self.state.consumed_samples} samples consumed)")
        if self._should_save(self.state.iteration):
            if self.guard.skipping():  # its weights are those of before the streak: keep that checkpoint newest
                _print0(f"megatron-swift: no checkpoint at step {self.state.iteration}: the divergence guard "
                        f"skipped the last {self.guard.consecutive} step(s)")
            else:
                self._save()
        return self.stops.check() if self.stops is not None else None

    def _checkpoint_at_or_before(self, step: int) -> Optional[str]:
        """The newest complete checkpoint of this run saved at or before ``step``, or None."""
        found = [c for c in ckpt.complete_checkpoints(ckpt.checkpoints_dir(self.output_dir))
                 if ckpt.read_meta(c)["iteration"] <= step]
        return found[-1] if found else None

    def fit(self) -> ckpt.TrainState:
        """Train to the end of the run, or until a stop request (then save and return)."""
        if self.state.iteration >= self.length.total_iters:
            _print0(f"nothing to train: {self.output_dir} is already at step {self.state.iteration} of "
                    f"{self.length.total_iters}; raise train.max_epochs/train.train_iters to continue, "
                    "or use a new train.output_dir")
        while self.state.iteration < self.length.total_iters:
            reason = self.step()
            if reason is not None:
                self._stop(reason)
                return self.state
        # Also covers train.train_iters=0, which writes the initial weights as iter_0000000.
        if self.cfg.train.save_at_end and not self._saved(self.state.iteration):
            self._save()
        return self.state

    def _stop(self, reason: str) -> None:
        self.stopped = reason
        if self.guard.skipping():  # as for periodic saves: a resume repeats the skipped steps from before them
            path = self._checkpoint_at_or_before(self.state.iteration - self.guard.consecutive)
            kept = f"the newest checkpoint is {path}, from before them" if path else "no checkpoint is from before them"
            _print0(f"megatron-swift: stopped by {reason} at step {self.state.iteration} while the divergence "
                    f"guard was skipping steps; not saved ({kept}). To continue, run the same command "
                    f"(train.resume=auto), or add train.output_dir={self.output_dir}")
            return
        path = ckpt.find_checkpoint(self.output_dir) if self._saved(self.state.iteration) else self._save()
        _print0(f"megatron-swift: stopped by {reason} at step {self.state.iteration} of {self.length.total_iters}; "
                f"checkpoint {path}. To continue, run the same command (train.resume=auto), or add "
                f"train.output_dir={self.output_dir}")

    def _saved(self, iteration: int) -> bool:
        latest = ckpt.complete_checkpoints(ckpt.checkpoints_dir(self.output_dir))
        return bool(latest) and ckpt.read_meta(latest[-1])["iteration"] == iteration


def model_meta(arch, vocab: int, padded: int, new_token_rows=()) -> dict:
    """Architecture numbers stored with each checkpoint (see checkpoint.save); ``new_token_rows``: the rows of
    model.new_tokens (a LoRA adapter export writes them as PEFT trainable tokens)."""
    meta = dict(family=arch.family.name, arch=dict(arch.plain(), vocab_size=vocab), padded_vocab_size=padded)
    return dict(meta, new_token_rows=list(new_token_rows)) if new_token_rows else meta


def _streaming(dataset) -> bool:
    return hasattr(dataset, "next_rows")


def _stateful(dataset) -> bool:
    """A source whose position is not a function of the step (a stream, rollouts): checkpoints keep its state."""
    return hasattr(dataset, "state")


def init_runtime(cfg):
    """Validate the config, then start the backend and megatron-core's parallel groups; returns (arch, backend)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = backend_mod.resolve_device(cfg.train.device)
    te = device == "cuda" and backend_mod.device.te_available()
    # The task decides the output layer: the LM head, or a reward model's scalar head.
    arch = dataclasses.replace(validate(cfg, world, te_available=te, device=device),
                               head=task_class(cfg.task.name).head)
    be = backend_mod.init(cfg.train.device, cfg.cluster.dist_timeout_minutes, cfg.model.attention_backend)
    par = cfg.parallel
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp if (par.vpp or 1) > 1 else None,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
        distributed_timeout_minutes=cfg.cluster.dist_timeout_minutes,
    )
    _seed(cfg.train.seed)
    return arch, be


def _choose_run(cfg, arch, world: int):
    """(run choice, checkpoint to resume or None, record stored with each checkpoint: settings and identity);
    refuses a resume whose data order or model would change (resume_check), reports schedule changes."""
    # Rank 0 reads the data files for their fingerprints (once per file: training/fingerprint.py); every rank
    # gets its answer.
    box = [resume_check.settings(cfg, arch) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    settings = box[0]
    identity = resume_check.identity(cfg, settings, world)
    choice = run_dir.decide(cfg, identity)
    _print0(f"megatron-swift: {choice.note}")
    run_dir.report_incomplete(choice.output_dir, _print0)
    resume_from = run_dir.intact_checkpoint(choice, _print0, verify=cfg.train.verify_checkpoints)
    if resume_from is not None:
        saved = ckpt.read_meta(resume_from).get("settings")
        if saved is None:
            _print0(f"megatron-swift: {resume_from} records no settings (an older checkpoint): resume not checked")
        else:
            refused, applied = resume_check.compare(saved, settings)
            if refused:
                raise ConfigError([resume_check.refusal_message(resume_from, refused)])
            for change in applied:
                _print0(f"megatron-swift: resuming with a changed setting, applied from this step on: {change}")
    return choice, resume_from, dict(settings=settings, identity=identity)


def _read_data(cfg, tokenizer, folder, output_dir: str, vision=None):
    """(train data, eval data or None, samples per epoch, is it a stream) as the task reads them; ``vision``:
    what image rows need of a VLM (data.images.vision_data)."""
    cache = os.path.join(output_dir, "data_cache")
    wanted = cfg.train.train_iters * cfg.train.global_batch_size if cfg.train.train_iters else None
    read_data = task_class(cfg.task.name).read_data  # preference tasks read their own row shapes
    if read_data is not None:
        train_data = read_data(cfg.data.path, cfg.data, tokenizer, cfg.train.seq_length, folder, cfg=cfg,
                               vision=vision)
        eval_data = (read_data(cfg.data.eval_path, cfg.data, tokenizer, cfg.train.seq_length, folder, cfg=cfg,
                               vision=vision) if cfg.data.eval_path else None)
    else:
        train_data = build_source(cfg.data, cfg.data.path, tokenizer, cfg.train.seq_length, cfg.train.seed,
                                  folder, wanted, cache, (ps.get_data_parallel_rank(),
                                                          ps.get_data_parallel_world_size()), vision=vision)
        eval_data = (build_source(cfg.data, cfg.data.eval_path, tokenizer, cfg.train.seq_length,
                                  cfg.train.seed + 1, folder, None, cache, vision=vision)
                     if cfg.data.eval_path else None)
    # A stream has no length known up front: the run is train_iters steps (validation asks for it) and
    # train.max_epochs does not apply.
    streaming = _streaming(train_data)
    samples = wanted if streaming else getattr(train_data, "samples_per_epoch", len(train_data))
    return train_data, eval_data, samples, streaming


def setup(cfg) -> Trainer:
    """Validate, then build everything a run needs; returns a Trainer positioned at its start or resume point."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    arch, be = init_runtime(cfg)
    par = cfg.parallel
    choice, resume_from, run_record = _choose_run(cfg, arch, world)
    output_dir = choice.output_dir
    if dist.get_rank() == 0:  # the folder is locked by this run (run_dir.decide): no one else writes them
        for name in ckpt.ckpt_store.remove_temporaries(ckpt.checkpoints_dir(output_dir)):
            _print0(f"megatron-swift: removed {name}, left by a save that did not finish")

    # Data before model: bad data stops the run before any weights or checkpoints are touched.
    tokenizer_spec = cfg.data.tokenizer or cfg.model.pretrained or cfg.model.llm or "byte"
    tokenizer = build_tokenizer(tokenizer_spec)
    folder = tokenizer_spec if os.path.isdir(tokenizer_spec) else None  # where a chat template may live
    added = new_tokens.add_to_tokenizer(tokenizer, cfg.model, _print0)  # model.new_tokens, before <image>
    vocab = added.grow(arch.vocab_size or tokenizer.vocab_size)
    arch, vocab = add_image_token(arch, vocab, tokenizer)  # VLMs: the id the data marks image positions with
    own_rows = task_class(cfg.task.name).read_data is not None  # the task reads its rows (which may have images)
    train_data, eval_data, num_samples, streaming = _read_data(cfg, tokenizer, folder, output_dir,
                                                               vision_data(cfg, arch, own_rows))
    length = run_length.plan(num_samples, cfg.train.global_batch_size, None if streaming else cfg.train.max_epochs,
                             cfg.train.train_iters, data=list(cfg.data.path))
    sampler = DataParallelSampler(num_samples, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                  ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(),
                                  cfg.train.seed, cfg.data.shuffle)

    if tokenizer.vocab_size > vocab:
        raise ConfigError([f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={vocab}; "
                           "raise model.vocab_size or use the model's tokenizer"])
    padded = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by, par.tp)
    arch = dataclasses.replace(arch, vocab_size=vocab)  # the real vocabulary: padding logits are masked
    # Random initialisation is skipped when every weight is loaded next (minutes on 8B+ models; a VLM composed
    # from an LLM and an encoder has a new projector).
    weights_given = resume_from is not None or bool(cfg.model.load) or bool(cfg.model.pretrained)
    tconfig = transformer_config(arch, cfg, be, initialize=not weights_given)
    lora = cfg.tuner.name == "lora"
    chunks = build_model(arch, tconfig, padded, cfg.train.seq_length, be, unfuse_norms=lora)
    # LoRA checkpoints hold the adapters only: the base is loaded again when resuming.
    load_base = resume_from is None or lora
    if cfg.model.load and load_base:
        _print0(f"initial weights from {ckpt.load_weights(cfg.model.load, chunks, cfg.train.verify_checkpoints)}")
    elif cfg.model.pretrained and load_base:
        load_hf_weights(chunks, cfg.model.pretrained, arch, padded)
        _print0(f"initial weights from HF checkpoint {cfg.model.pretrained}")
    elif cfg.model.llm and load_base:
        load_composed_weights(chunks, cfg.model.llm, cfg.model.vision, arch, padded)
        _print0(f"initial weights from HF checkpoints {cfg.model.llm} (language) and {cfg.model.vision} (vision); "
                "new projector")
    if resume_from is None or lora:  # a resume's checkpoint holds every value (LoRA: the new rows too)
        loaded = "all" if cfg.model.load else "marked" if (cfg.model.pretrained or cfg.model.llm) else "none"
        unloaded.initialise(chunks, cfg, arch, padded, added, loaded, _print0)
    _print0(apply_tuner(chunks, cfg))
    opened = new_tokens.train_new_rows_only(chunks, added, arch.head)  # LoRA / frozen embedding: new rows train
    if opened:
        _print0(f"megatron-swift: new token rows train (only they) in {', '.join(opened)}")
    model = wrap_model(chunks, tconfig, par)
    optimizer = build_optimizer(model, tconfig, cfg.train, par)
    new_tokens.install_row_masks(optimizer, model)
    scheduler = build_scheduler(optimizer, cfg.train, length.total_iters)
    guard = StepGuard(cfg.train.max_skipped_steps, cfg.train.loss_spike_factor, cfg.train.loss_spike_window)
    guard.install(optimizer)
    run_dir.claim(output_dir, _print0)
    datasets = [("train", train_data)] + ([("eval", eval_data)] if eval_data is not None else [])
    task = build_task(cfg, be, arch, padded, datasets, output_dir, model=model)
    source = getattr(task, "batch_source", None)
    train_data = source(train_data) if source is not None else train_data
    state = ckpt.TrainState()
    if resume_from is not None:
        # Under another cp/DP split the old ranks' RNG states do not apply: seeded anew from the step.
        state = ckpt.load_full(resume_from, model, optimizer, scheduler,
                               train_data if _stateful(train_data) else None,
                               reseed=lambda step: _seed(cfg.train.seed + step))
        guard.restore(ckpt.read_meta(resume_from).get("guard"))  # its window of losses, skips so far
        _print0(f"resumed from {resume_from} at step {state.iteration} (epoch {state.epoch}, "
                f"{state.consumed_samples} samples consumed)")

    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    _print0(f"megatron-swift: {arch.family.name}-{cfg.model.size} on {world} {be.device} rank(s) "
            f"(tp={par.tp} pp={par.pp} vpp={par.vpp or 1} cp={par.cp} dp={ps.get_data_parallel_world_size()} ep={par.ep} "
            f"sp={par.sp}), {n_params / 1e6:.2f}M params on rank 0, TE={'on' if be.use_te else 'off'}, "
            f"attention={be.attention}{be.fusions()}; "
            f"data {train_data.description}: {num_samples} samples, {length.steps_per_epoch} steps/epoch, "
            f"{length.total_iters} steps in all; output {output_dir}")
    if be.peak_tflops():
        _print0(f"megatron-swift: MFU is against {be.peak_tflops():.0f} TFLOP/s, the dense bf16 peak of "
                f"{be.device_name()} (FLOPs per step: training/flops.py)")
    trainer = Trainer(cfg, be, arch, model, optimizer, scheduler, train_data, eval_data, sampler, length,
                      output_dir, flops_per_step(arch, cfg.train.seq_length, padded, cfg.train.global_batch_size,
                                                 getattr(train_data, "images_per_row", 0.0), cfg.train.train_vision,
                                                 getattr(train_data, "image_tokens_per_row", 0.0),
                                                 getattr(train_data, "image_sizes", None)),
                      state, model_meta(arch, vocab, padded, added.rows))
    trainer.guard = guard
    trainer.resumed_from = resume_from
    trainer.run_meta = dict(run_record, total_iters=length.total_iters)
    progress = Progress(length.total_iters, cfg.train.max_epochs, state.iteration)
    trainer.task = task
    trainer.sinks = Sinks(cfg, output_dir, OmegaConf.to_container(cfg, resolve=True), _log_rank(), progress,
                          resumed_at=state.iteration)
    if dist.get_rank() == 0:
        with open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(cfg))
    return trainer


def export_final_hf(trainer) -> None:
    """Convert the final checkpoint to an HF folder (rank 0, a fresh one-process job).

    The conversion reshards to TP=PP=1 in its own process group, so it runs as a
    child process without this job's torchrun environment."""
    import subprocess
    import sys

    dist.barrier()
    if dist.get_rank() == 0:
        latest = ckpt.complete_checkpoints(ckpt.checkpoints_dir(trainer.output_dir))[-1]
        out = os.path.join(trainer.output_dir, "hf", os.path.basename(latest))
        tool = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "tools", "convert", "mcore_to_hf.py")
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                            "MASTER_PORT") and not k.startswith("TORCHELASTIC")}
        if not os.path.isdir(out):
            subprocess.run([sys.executable, tool, "--ckpt", latest, "--out", out], env=env, check=True)
        _print0(f"HF export: {out}")
    dist.barrier()


def run(cfg) -> ckpt.TrainState:
    """Train as the config says; returns the final counters. SIGTERM/SIGINT/SIGUSR1 (and
    train.exit_duration_minutes) stop it after the current step, with a checkpoint."""
    stops = StopRequests(cfg.train.exit_duration_minutes, started=time.monotonic()).install()
    try:
        trainer = setup(cfg)
        trainer.stops = stops
        run_index.started(trainer.output_dir, trainer.resumed_from, trainer.state.iteration,
                          trainer.length.total_iters)
        try:
            state = trainer.fit()
        except BaseException as e:  # recorded in outputs/runs.jsonl, then handled as before (cli.run_or_exit)
            status = "diverged" if isinstance(e, Diverged) else f"failed: {type(e).__name__}"
            run_index.ended(trainer.output_dir, status, trainer.state.iteration, trainer.length.total_iters)
            raise
        finally:
            trainer.sinks.close()
    finally:
        stops.uninstall()
    status = f"stopped by {trainer.stopped}" if trainer.stopped else "finished"
    run_index.ended(trainer.output_dir, status, state.iteration, trainer.length.total_iters)
    if trainer.stopped:
        return state
    if cfg.train.save_hf:
        export_final_hf(trainer)
    _print0(f"done: {state.iteration} steps, epoch {state.iteration / trainer.length.steps_per_epoch:.2f}, "
            f"{state.consumed_samples} samples consumed")
    return state
