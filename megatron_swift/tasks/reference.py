"""The part DPO, IPO and KTO share: a frozen reference model and its per-row log-probabilities.

A dataset item is two rows (data.preference) and a micro-batch of ``m`` items
is ``2m`` rows. Before the policy's forward/backward, the reference runs the
same micro-batches through megatron-core's forward-only schedule, and its
per-row log-probabilities (summed over completion tokens, computed on the last
pipeline stage from the vocabulary-parallel cross-entropy, so correct under TP
and PP) are attached to the batches as ``ref_logps``. With
``task.precompute_ref`` they are computed once per item instead, kept in the
run directory, and the reference model is freed. Subclasses write
``loss_func(batch, token_losses)``: the loss summed over items, the item count
(so gradients are the mean over the global batch whatever the layout), and
[sum, count] reports of their metrics.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_swift.data.preference import preference_source
from megatron_swift.models.vlm import image_inputs
from megatron_swift.tasks.base import rows_from_jsonl
from megatron_swift.tasks.reports import reduce_reports
from megatron_swift.training import cp_shard
from megatron_swift.training.forward_only import collect, eval_mode


def sequence_logps(token_losses: torch.Tensor, loss_mask: torch.Tensor):
    """(sum of log-probabilities over each row's loss tokens, number of such tokens) from per-token CE."""
    mask = loss_mask.float()  # with context parallelism: this rank's tokens, summed over the CP group
    return cp_shard.sum_over_cp(-(token_losses.float() * mask).sum(-1)), cp_shard.sum_over_cp(mask.sum(-1))


def lm_forward(batch, model):
    """Per-token cross-entropy of the rows (the model's own vocabulary-parallel loss); a VLM's rows with their
    images (or a held tower's media) and image_index, as task=lm passes them."""
    return model(batch.tokens, batch.position_ids, attention_mask=None, labels=batch.labels, **image_inputs(batch))


def pair_rows_step(loss_func):
    """megatron-core's forward_step_func for pair rows scored by the policy's per-token loss: ``loss_func(batch,
    token_losses)`` counted once per context-parallel group (DPO, KTO, CPO, SimPO, ORPO)."""
    def step(data_iterator, model):
        batch = next(data_iterator)
        return lm_forward(batch, model), cp_shard.counted_once(partial(loss_func, batch))

    return step


class ReferenceTask:
    rows_per_sample = 2
    # Policy forward+backward (3 units) plus the reference forward (1 unit); precomputed: 1.
    forward_passes = 4 / 3
    head = "lm"  # the policy's output layer (models.builder)
    read_data = staticmethod(preference_source)  # (paths, data_cfg, tokenizer, seq_length, folder) -> dataset
    takes_images = True  # rows with images (data.preference), passed to the policy and the reference alike

    @classmethod
    def validate(cls, cfg, problems: List[str]) -> None:
        """beta, label smoothing, loss type (DPO) and starting weights for the policy and its reference."""
        task = cfg.task
        if task.beta <= 0:
            problems.append(f"task.beta={task.beta} must be > 0")
        if not (task.ref_model or cfg.model.pretrained or cfg.model.load):
            problems.append(f"task={task.name} needs starting weights for the policy and its frozen reference: set "
                            "model.pretrained (HF folder) or model.load (checkpoint), or task.ref_model")
        rows_from_jsonl(cfg, problems)

    def __init__(self, task_cfg, reference: Optional[List[torch.nn.Module]], seq_length: int,
                 micro_batch_size: int):
        self.cfg = task_cfg
        self.reference = reference
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.tables: Dict[int, torch.Tensor] = {}  # id(dataset) -> [items, 2] precomputed reference log-probs

    # The policy itself, when the reference is the policy with its LoRA adapters disabled.
    policy: Optional[List[torch.nn.Module]] = None

    @staticmethod
    def reference_copies(cfg) -> int:
        """Frozen copies of the policy held while training (the memory planner counts them): none when the
        reference log-probs are precomputed (the model is freed first) or LoRA's base is the reference."""
        return int(not (cfg.task.precompute_ref or _base_is_reference(cfg)))

    @classmethod
    def build(cls, cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".", model=None):
        base_is_reference = _base_is_reference(cfg)
        reference = None if base_is_reference else build_reference(cfg, backend, arch, padded_vocab)
        task = cls(cfg.task, reference, cfg.train.seq_length, cfg.train.micro_batch_size)
        task.policy = model if base_is_reference else None
        if cfg.task.precompute_ref:
            for name, dataset in datasets:
                task.tables[id(dataset)] = task.precompute(dataset, os.path.join(output_dir, f"ref_logps_{name}.pt"),
                                                           backend.torch_device)
            task.reference = task.policy = None  # not needed any more: a reference model's memory is freed
            task.forward_passes = 1.0
        return task

    def prepare(self, batches, dataset=None) -> None:
        """Attach the reference model's per-row log-probabilities to each batch (last pipeline stage)."""
        table = self.tables.get(id(dataset))
        if table is not None:
            for batch in batches:
                ids = batch.sample_ids.to(table.device)
                batch.ref_logps = torch.cat([table[ids, 0], table[ids, 1]]).to(batch.tokens.device)
            return
        self._reference_logps(batches)

    def precompute(self, dataset, path: str, device) -> torch.Tensor:
        """[items, 2] reference log-probs of both rows of every item, each DP rank doing its share;
        kept in ``path`` so that a resumed run does not compute them again."""
        if os.path.isfile(path):
            table = torch.load(path, weights_only=True)
            if table.shape == (len(dataset), 2):
                return table
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        table = torch.zeros(len(dataset), 2, device=device)
        mine = list(range(rank, len(dataset), dp))
        for start in range(0, len(mine), self.micro_batch_size):
            ids = mine[start:start + self.micro_batch_size]
            ids += [ids[-1]] * (self.micro_batch_size - len(ids))  # pipeline shapes need full micro-batches
            batch = cp_shard.shard(dataset.collate([dataset[i] for i in ids]).to(device))
            self._reference_logps([batch])
            if batch.ref_logps is not None:
                m = len(ids)
                table[ids, 0], table[ids, 1] = batch.ref_logps[:m], batch.ref_logps[m:]
        dist.all_reduce(table, group=ps.get_data_parallel_group())  # disjoint rows: the sum gathers them
        if dist.get_rank() == dist.get_world_size() - 1:  # a last-stage rank holds the values
            torch.save(table.cpu(), path + ".tmp")
            os.replace(path + ".tmp", path)
        return table

    def _reference_logps(self, batches) -> None:
        def run(model):
            return collect(model, batches, lm_forward, lambda batch, out: sequence_logps(out, batch.loss_mask)[0],
                           self.seq_length, self.rows_per_sample * self.micro_batch_size)

        if self.policy is not None:
            logps = _base_of_policy(self.policy, run)
        else:
            logps = run(self.reference)
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            for batch, ref in zip(batches, logps):
                batch.ref_logps = ref.detach()

    def forward_step(self):
        return pair_rows_step(self.loss_func)

    def loss_func(self, batch, token_losses: torch.Tensor):
        raise NotImplementedError

    def metrics(self, reports: List[dict], device) -> Dict[str, float]:
        return reduce_reports(reports, device)


def _base_is_reference(cfg) -> bool:
    """With LoRA the base weights are frozen: the policy without its adapters is the reference."""
    return cfg.tuner.name == "lora" and not cfg.task.ref_model


def _base_of_policy(policy, run):
    """``run(policy)`` with the adapters disabled and dropout off, then the policy as it was."""
    from megatron_swift.tuners.lora import adapters_disabled

    with eval_mode(policy), adapters_disabled(policy):
        return run(policy)


def per_item_reports(figures: Dict[str, torch.Tensor], count: torch.Tensor) -> Dict[str, torch.Tensor]:
    """[sum, count] of each per-item figure."""
    return {name: torch.stack([value.sum(), count]) for name, value in figures.items()}


def build_reference(cfg, backend, arch, padded_vocab: int, policy=None) -> List[torch.nn.Module]:
    """Frozen model chunks with the policy's layout, loaded from task.ref_model or the starting weights:
    model.pretrained / model.load, else (a run from scratch) a copy of ``policy``'s weights as they are now."""
    from megatron_swift.training.optim import frozen_model

    from megatron_swift.convert.hf_load import load_hf_weights
    from megatron_swift.models.builder import build_model, transformer_config
    from megatron_swift.models.new_tokens import reference_rows
    from megatron_swift.training import checkpoint as ckpt

    tconfig = transformer_config(arch, cfg, backend, initialize=False)
    chunks = build_model(arch, tconfig, padded_vocab, cfg.train.seq_length, backend)
    source = cfg.task.ref_model or cfg.model.pretrained or cfg.model.load
    if source is None:
        _copy_weights(policy, chunks)
    elif os.path.isfile(os.path.join(source, "config.json")):
        load_hf_weights(chunks, source, arch, padded_vocab)
        reference_rows(chunks, cfg, arch)  # model.new_tokens: the rows the policy started from
    else:
        ckpt.load_weights(source, chunks)
    return frozen_model(chunks, tconfig)


def _copy_weights(policy, chunks) -> None:
    """The policy's current weights into the reference's chunks (same layout, same parameter names)."""
    from megatron.core.utils import unwrap_model

    if policy is None:
        raise ValueError("a reference without task.ref_model, model.pretrained or model.load copies the policy")
    for source, target in zip(unwrap_model(list(policy)), chunks):
        target.load_state_dict(source.state_dict())
