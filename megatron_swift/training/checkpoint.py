"""Megatron distributed checkpoints (torch_dist): what goes into one, saved atomically, loaded exactly.

Where checkpoints live and how they are verified and pruned is
``ckpt_store``. A save goes to ``.tmp.iter_N``; once every rank has written its
shards, the files are hashed into the manifest, rank 0 writes
``megatron_swift.json`` (counters, layout, the run's config, manifest) last and
renames the folder to ``iter_N``, so a crash mid-save leaves the previous
checkpoint as the latest complete one. Weights that are not finite are never
saved. Model weights are stored per parameter in global (unsharded)
coordinates by megatron-core, so they load under any TP/PP/EP layout;
optimizer state is restored under the TP/PP/VPP/EP layout it was saved with,
over any split of the batch into data and context parallel ranks
(``check_layout``); per-rank RNG state only under the very same layout.
"""
from __future__ import annotations

import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.distributed.checkpoint.api import CheckpointException

from megatron_swift.backend import collective_device
from megatron_swift.backend.no_apex import fuse_adam, torch_optimizers
from megatron_swift.training import ckpt_space, ckpt_store, ckpt_writer, safe_load, save_deadline
from megatron_swift.training.ckpt_store import (  # noqa: F401  (the checkpoint API other modules use)
    META, checkpoints_dir, complete_checkpoints, find_checkpoint, read_meta)
from megatron_swift.training.errors import CheckpointError, Diverged, NoSpace

_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
SAVE_TIMEOUT_S = 30 * 60.0  # cluster.dist_timeout_minutes' default: a save may wait as long as a collective


@dataclass
class TrainState:
    """Counters that say where a run is; saved with every checkpoint."""

    iteration: int = 0
    consumed_samples: int = 0
    epoch: int = 0


def _unwrap(chunk):
    """DDP and Float16Module wrap the GPTModel; checkpoints address the GPTModel."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


# Per-layer (and per-expert) keys instead of one tensor stacked over all layers, for runs with frozen
# parameters (train.freeze*, LoRA): a stacked tensor must be covered whole by the ranks that write it,
# and the optimizer state of a partly frozen stack (or the adapters of a partly adapted one) is not.
_PER_LAYER = {"non_homogeneous_layers": True, "singleton_local_shards": True}


def _model_sharded(model, trainable_only: bool = False, per_layer: bool = False) -> Dict[str, dict]:
    def one(chunk) -> dict:
        metadata = dict(_PER_LAYER) if per_layer else None
        if getattr(_unwrap(chunk), "mtp_process", False):
            # megatron-core 0.16.1: a stage with MTP layers but no embedding of its own (PP > 1) reads
            # metadata['dp_cp_group'] to shard its embedding copy, and fails on the default metadata=None.
            from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

            metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = _unwrap(chunk).sharded_state_dict(metadata=metadata)
        return _trainable_entries(chunk, sharded) if trainable_only else sharded

    if len(model) == 1:
        return {"model": one(model[0])}
    return {f"model{i}": one(chunk) for i, chunk in enumerate(model)}


def _trainable_entries(chunk, sharded: dict) -> dict:
    """The entries of a model's sharded state dict that hold trainable parameters (LoRA adapters,
    modules_to_save): an adapter-only checkpoint. Each entry's data is the parameter itself."""
    trainable = {id(p) for p in _unwrap(chunk).parameters() if p.requires_grad}
    return {k: v for k, v in sharded.items() if id(getattr(v, "data", None)) in trainable}


def _layout(optimizer=None) -> Dict[str, int]:
    """The layout a checkpoint's optimizer and RNG state are tied to (with the optimizer's kind if given)."""
    layout = {
        "world": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        "cp": ps.get_context_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
    }
    if optimizer is not None:
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        chained = getattr(optimizer, "chained_optimizers", [optimizer])
        layout["distributed_optimizer"] = any(isinstance(o, DistributedOptimizer) for o in chained)
    return layout


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _per_rank(key: str, state: Optional[dict]) -> ShardedObject:
    # One object per global rank (RNG, data stream position): only meaningful under the same layout.
    return ShardedObject(key, state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _prime_adam_state(optimizer) -> None:
    """Give every parameter of a fresh torch Adam an all-zero state with ``step``.

    megatron-core 0.16 builds the loading template from the optimizer's own
    state dict; without TE/Apex its Adam is torch's, whose state is empty until
    the first step, and the template then fails (``assert len(steps) == 1`` in
    ``DistributedOptimizer.state_dict``). Zeros of the right shapes are a valid
    template; the checkpoint overwrites them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _frozen(model) -> bool:
    """Whether some parameter anywhere does not train (every rank must agree: the key layout follows)."""
    complete = torch.tensor(float(all(p.requires_grad for chunk in model for p in _unwrap(chunk).parameters())),
                            device=collective_device())
    dist.all_reduce(complete, op=dist.ReduceOp.MIN)
    return not complete.item()


def _full_sharded_state(model, optimizer, scheduler, for_loading: bool, data=None,
                        adapter_only: bool = False, frozen: bool = False) -> dict:
    """Model (all of it, or its trainable part with per-layer keys), optimizer (per-layer keys when some
    parameters are frozen), scheduler, RNG and data-stream state."""
    state = _model_sharded(model, trainable_only=adapter_only, per_layer=adapter_only)
    if for_loading:
        _prime_adam_state(optimizer)
    template = _model_sharded(model, per_layer=True) if frozen and not adapter_only else state
    merged = {}
    for value in template.values():
        merged.update(value)
    # dp_reshardable: each rank writes its own optimizer shard with no gathering
    # (the 0.16 default, fully_sharded_model_space, is refused by its own ShardedTensor
    # validation); resharding is limited to DP (x CP), which is what a resume may change (check_layout).
    state["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=for_loading, metadata=_OPTIM_METADATA)
    state["scheduler"] = scheduler.state_dict()
    state["rng"] = _per_rank("rng_state", None if for_loading else _rng_state())
    if data is not None:  # a streaming source: where each rank's stream stands
        state["data"] = _per_rank("data_state", None if for_loading else data.state())
    return state


def _all_finite(model) -> bool:
    """Whether every weight on every rank is finite (collective)."""
    finite = all(bool(torch.isfinite(p).all()) for chunk in model for p in _unwrap(chunk).parameters())
    flag = torch.tensor(float(finite), device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(output_dir: str, state: TrainState, model, optimizer, scheduler, config_yaml: str, keep_last: int,
         model_meta: Optional[dict] = None, data=None, adapter_only: bool = False,
         run_meta: Optional[dict] = None, timeout_s: float = SAVE_TIMEOUT_S) -> str:
    """Write ``iter_N`` atomically (temporary dir, then rename) and prune to ``keep_last``; a save still
    running after ``timeout_s`` ends the process with one line (save_deadline).

    ``model_meta`` (architecture and vocabulary numbers) goes into megatron_swift.json so
    that export tools can rebuild the model without the original HF folder; ``run_meta`` (the
    settings a resume must agree with, the planned length) so that a resume can check them.
    ``adapter_only`` (LoRA) stores the trainable parameters only; the base comes from
    model.pretrained/load. Refuses (:class:`Diverged`) to write weights that are not finite."""
    if not _all_finite(model):
        raise Diverged(f"the weights at step {state.iteration} are not all finite; no checkpoint was written "
                       f"(the previous ones in {checkpoints_dir(output_dir)} are kept)")
    frozen = _frozen(model)
    meta = dict(state.__dict__, layout=_layout(optimizer), model=model_meta or {}, adapter_only=adapter_only, frozen=frozen,
                **(run_meta or {}))
    return _write(output_dir, state.iteration,
                  lambda: _full_sharded_state(model, optimizer, scheduler, False, data, adapter_only, frozen),
                  config_yaml, meta, keep_last, timeout_s)


def save_weights(output_dir: str, model, config_yaml: str, model_meta: dict) -> str:
    """Write model weights only, as ``iter_0000000`` (converters): start training from it with model.load."""
    meta = dict(TrainState().__dict__, layout=_layout(), model=model_meta, weights_only=True)
    return _write(output_dir, 0, lambda: _model_sharded(model), config_yaml, meta, keep_last=0)


def _write(output_dir: str, iteration: int, sharded_fn, config_yaml: str, meta: dict, keep_last: int,
           timeout_s: float = SAVE_TIMEOUT_S) -> str:
    ckpt_writer.install()
    what = f"saving the checkpoint of step {iteration} into {checkpoints_dir(output_dir)}"
    stacks = os.path.join(output_dir, f"save_stuck.rank{dist.get_rank()}.txt")
    with save_deadline.bounded(timeout_s, what, stacks):
        return _write_now(output_dir, iteration, sharded_fn, config_yaml, meta, keep_last)


def _write_now(output_dir: str, iteration: int, sharded_fn, config_yaml: str, meta: dict, keep_last: int) -> str:
    ckpt_dir = checkpoints_dir(output_dir)
    final = os.path.join(ckpt_dir, ckpt_store.iter_name(iteration))
    tmp = os.path.join(ckpt_dir, ".tmp." + ckpt_store.iter_name(iteration))
    rank0 = dist.get_rank() == 0
    sharded = sharded_fn()
    ckpt_space.check(ckpt_dir, sharded, iteration)  # a short disk stops every rank before anything is written
    if rank0:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)  # left by a save that crashed
        os.makedirs(tmp)
    dist.barrier()
    try:
        dist_checkpointing.save(sharded, tmp)  # wants an empty folder: config.yaml comes after
        if rank0:
            with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(config_yaml)
        dist.barrier()
        manifest = ckpt_store.make_manifest(tmp)
        if rank0:
            _write_meta(tmp, dict(meta, complete=True, manifest=manifest))
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        if not ckpt_space.is_no_space(e):
            raise
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoints are whole
        raise NoSpace(ckpt_space.message(ckpt_dir, iteration, None, ckpt_space.free_bytes(ckpt_dir))) from None
    if rank0:
        if os.path.isdir(final):  # an older save of this step (a resume from before it): replaced, marker first
            if os.path.isfile(os.path.join(final, META)):
                os.remove(os.path.join(final, META))
            shutil.rmtree(final)
        os.rename(tmp, final)
        ckpt_store.prune(ckpt_dir, keep_last)
    dist.barrier()
    return final


def _write_meta(folder: str, meta: dict) -> None:
    import json

    with open(os.path.join(folder, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def load_weights(path: str, model, verify: bool = True) -> str:
    """Load only model weights from a checkpoint (any layout), checked against its manifest first unless
    ``verify`` is off; returns the iter dir used."""
    ckpt = find_checkpoint(path)
    if read_meta(ckpt).get("adapter_only"):
        raise CheckpointError(f"checkpoint {ckpt} holds LoRA adapters only, not a whole model: export it with "
                              "tools/convert/mcore_to_hf.py (merged), or resume it with tuner=lora and its base")
    if verify:
        _require_intact(ckpt)
    sharded = _model_sharded(model)
    _load_model(_dcp_load(sharded, ckpt), list(sharded), model)
    return ckpt


def _require_intact(ckpt: str) -> None:
    problems = ckpt_store.verify(ckpt)
    if problems:
        raise CheckpointError(f"checkpoint {ckpt} is damaged: {'; '.join(problems[:4])}")


def _dcp_load(sharded: dict, ckpt: str) -> dict:
    """megatron-core's load through safe_load (no code from the checkpoint runs), the checkpoint named in any
    failure."""
    try:
        return safe_load.load(sharded, ckpt)
    except CheckpointError:  # safe_load's refusals included
        raise
    # A torn or foreign file surfaces as whatever the reader trips on; DCP collects the ranks' failures into a
    # CheckpointException, which derives from BaseException (torch 2.x), so ``except Exception`` misses it.
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"checkpoint {ckpt} cannot be loaded: {_first_failure(e)}") from e


def _first_failure(error: BaseException) -> str:
    """``Class: first line`` of what went wrong; for a CheckpointException, of the first rank's own failure."""
    failures = getattr(error, "failures", None) if isinstance(error, CheckpointException) else None
    if failures:
        error = next(iter(failures.values()))[0]
    text = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {text[0] if text else ''}"


def _load_model(loaded: dict, keys: List[str], model, adapter_only: bool = False) -> None:
    for key, chunk in zip(keys, model):
        module = _unwrap(chunk)
        missing, unexpected = module.load_state_dict(loaded[key], strict=not adapter_only)
        if adapter_only:  # the frozen base is not in the checkpoint; every trainable parameter must be
            trainable = {n for n, p in module.named_parameters() if p.requires_grad}
            absent = sorted(trainable & set(missing)) + sorted(unexpected)
            if absent:
                raise CheckpointError(f"adapter checkpoint does not match this model's trainable parameters: "
                                      f"{absent[:6]}")


@contextmanager
def _config_hyperparameters(optimizer):
    """Keep this run's optimizer hyperparameters (max/min lr, betas, eps, weight decay, ...) across loading a
    checkpoint: the config in force wins over the one the checkpoint was saved with, and the resume check
    reports what changed. Only the per-parameter state, Adam's step and the scheduler's position come from
    the checkpoint."""
    fresh = [[{k: v for k, v in g.items() if k not in ("params", "step", "lr")} for g in inner.param_groups]
             for inner in torch_optimizers(optimizer)]
    yield
    for inner, groups in zip(torch_optimizers(optimizer), fresh):
        for group, values in zip(inner.param_groups, groups):
            group.update(values)


def _restore_adam_steps(optimizer) -> None:
    """Give each parameter its own Adam ``step`` again, at the checkpoint's value.

    megatron-core 0.16's DistributedOptimizer without Apex/TE (torch's Adam) stores the step once per
    param group; on load it (a) puts ONE tensor into every parameter's state, which torch's foreach
    Adam then increments once per parameter per step, and (b) with dp_reshardable copies the loading
    template's step (0) over it. Bias correction is then wrong after every resume. The group's
    ``step`` (restored from the checkpoint) is the true value."""
    for inner in torch_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" not in group:  # per-parameter steps were saved and loaded as they are
                continue
            for p in group["params"]:
                state = inner.state.get(p)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32,
                                                 device=state["step"].device)


# What may differ between a checkpoint and the run resuming it: how the batch is split over data and context
# parallel ranks. Model weights are sharded by TP/PP/EP only; the optimizer's state either follows the weights
# or (distributed optimizer, dp_reshardable) is sharded over DP x CP in a form megatron-core reshards.
_RESHARDABLE = ("world", "cp")


def check_layout(ckpt: str, meta: dict, optimizer, stateful_source: bool = False) -> bool:
    """Whether resuming from ``ckpt`` changes the layout (only data/context parallelism may change); raises
    CheckpointError for any other difference, or when a source keeps per-rank state (a stream, rollouts)."""
    if meta.get("weights_only"):
        raise CheckpointError(f"checkpoint {ckpt} holds model weights only (written by a converter); start a "
                              f"run from it with model.load={ckpt} and a new train.output_dir")
    now_layout = _layout(optimizer)
    if meta["layout"] == now_layout:
        return False
    saved = " ".join(f"{k}={v}" for k, v in meta["layout"].items())
    now = " ".join(f"{k}={v}" for k, v in now_layout.items())
    fixed = [k for k in set(meta["layout"]) | set(now_layout)
             if k not in _RESHARDABLE and meta["layout"].get(k) != now_layout.get(k)]
    if fixed:
        raise CheckpointError(
            f"checkpoint {ckpt} was saved with layout {saved} but this run uses {now}; a resume may change only "
            f"parallel.cp and the number of data-parallel ranks: resume with the saved tp/pp/vpp/ep/etp and "
            f"optimizer, or start a new run from its weights with model.load={ckpt} and a new train.output_dir")
    if stateful_source:
        raise CheckpointError(
            f"checkpoint {ckpt} was saved with layout {saved} but this run uses {now}; this run's data source "
            "keeps a position per rank (a stream, or rollouts), which does not carry over to another split of "
            "the batch: resume with the saved layout")
    return True


def load_full(ckpt: str, model, optimizer, scheduler, data=None, reseed=None) -> TrainState:
    """Restore weights, optimizer, scheduler, RNG and counters to continue a run.

    Under another split over data/context parallel ranks (``check_layout``) the weights, optimizer state
    (resharded by megatron-core), scheduler and data position (a function of the step) carry over; the
    per-rank RNG states do not (they belong to the old ranks): ``reseed(iteration)`` seeds the new ones. Any
    other layout change is refused (use model.load to start a new run from its weights instead)."""
    meta = read_meta(ckpt)
    changed = check_layout(ckpt, meta, optimizer, stateful_source=data is not None)
    adapter_only = bool(meta.get("adapter_only"))
    if bool(meta.get("frozen")) != _frozen(model):  # an adapter-only checkpoint is always a frozen one
        saved = "LoRA adapters only" if adapter_only else ("some" if meta.get("frozen") else "no") + \
            " frozen parameters"
        raise CheckpointError(f"checkpoint {ckpt} was saved with {saved} and this run differs: resume with the "
                              "same train.freeze*/tuner settings")
    sharded = _full_sharded_state(model, optimizer, scheduler, for_loading=True, data=data,
                                  adapter_only=adapter_only, frozen=bool(meta.get("frozen")))
    if changed:
        del sharded["rng"]  # one object per old rank: nothing to give the new ones
    model_keys = [k for k in sharded if k.startswith("model")]
    loaded = _dcp_load(sharded, ckpt)
    _load_model(loaded, model_keys, model, adapter_only)
    # fp32 main params are views of the model's leaf params; megatron-core's
    # dp_reshardable loader copies into them outside no_grad (0.16).
    with torch.no_grad(), _config_hyperparameters(optimizer):
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer)
    fuse_adam(optimizer)  # a checkpoint from before fused Adam, or steps loaded onto another device
    scheduler.load_state_dict(loaded["scheduler"])
    if changed:
        if reseed is not None:
            reseed(meta["iteration"])
    else:
        _set_rng_state(loaded["rng"])
    if data is not None:
        data.restore(loaded["data"])
    counters = {k: meta[k] for k in ("iteration", "consumed_samples", "epoch")}
    return TrainState(**counters)
