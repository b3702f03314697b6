"""Megatron distributed checkpoints (torch_dist), saved atomically, pruned to the last K.

Layout of a run directory::

    <output_dir>/checkpoints/iter_0000042/      one complete checkpoint
        megatron_swift.json                    iteration, epoch, samples, layout (written last)
        ...                                    dist_checkpointing shards + metadata
    <output_dir>/checkpoints/.tmp.iter_0000050/ a save in progress (never loaded)

A save goes to ``.tmp.iter_N`` and is renamed to ``iter_N`` by rank 0 only
after every rank has finished writing, so a crash mid-save leaves the previous
checkpoint as the latest complete one. Model weights are stored per
parameter in global (unsharded) coordinates by megatron-core, so they load
under any TP/PP/EP layout; optimizer and RNG state are restored only under
the layout they were saved with.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker

META = "megatron_swift.json"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
_ITER_RE = re.compile(r"^iter_(\d{7})$")


@dataclass
class TrainState:
    """Counters that say where a run is; saved with every checkpoint."""

    iteration: int = 0
    consumed_samples: int = 0
    epoch: int = 0


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def _iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def complete_checkpoints(ckpt_dir: str) -> List[str]:
    """Complete checkpoint directories, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = [n for n in os.listdir(ckpt_dir) if _ITER_RE.match(n) and os.path.isfile(os.path.join(ckpt_dir, n, META))]
    return [os.path.join(ckpt_dir, n) for n in sorted(names)]


def find_checkpoint(path: str) -> str:
    """Accept a run dir, its checkpoints dir or an iter_N dir; return the latest complete iter_N dir."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    for candidate in (checkpoints_dir(path), path):
        found = complete_checkpoints(candidate)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no complete megatron-swift checkpoint under {path}")


def read_meta(ckpt: str) -> dict:
    with open(os.path.join(ckpt, META), encoding="utf-8") as f:
        return json.load(f)


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
        sharded = _unwrap(chunk).sharded_state_dict(metadata=dict(_PER_LAYER) if per_layer else None)
        return _trainable_entries(chunk, sharded) if trainable_only else sharded

    if len(model) == 1:
        return {"model": one(model[0])}
    return {f"model{i}": one(chunk) for i, chunk in enumerate(model)}


def _trainable_entries(chunk, sharded: dict) -> dict:
    """The entries of a model's sharded state dict that hold trainable parameters (LoRA adapters,
    modules_to_save): an adapter-only checkpoint. Each entry's data is the parameter itself."""
    trainable = {id(p) for p in _unwrap(chunk).parameters() if p.requires_grad}
    return {k: v for k, v in sharded.items() if id(getattr(v, "data", None)) in trainable}


def _layout() -> Dict[str, int]:
    return {
        "world": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
    }


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
    complete = torch.tensor(float(all(p.requires_grad for chunk in model for p in _unwrap(chunk).parameters())))
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
    # validation); resharding is limited to DP, and resume already requires the same layout.
    state["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=for_loading, metadata=_OPTIM_METADATA)
    state["scheduler"] = scheduler.state_dict()
    state["rng"] = _per_rank("rng_state", None if for_loading else _rng_state())
    if data is not None:  # a streaming source: where each rank's stream stands
        state["data"] = _per_rank("data_state", None if for_loading else data.state())
    return state


def save(output_dir: str, state: TrainState, model, optimizer, scheduler, config_yaml: str, keep_last: int,
         model_meta: Optional[dict] = None, data=None, adapter_only: bool = False) -> str:
    """Write ``iter_N`` atomically (temporary dir, then rename) and prune to ``keep_last``.

    ``model_meta`` (architecture and vocabulary numbers) goes into megatron_swift.json so
    that export tools can rebuild the model without the original HF folder. ``adapter_only``
    (LoRA) stores the trainable parameters only; the base comes from model.pretrained/load."""
    frozen = _frozen(model)
    meta = dict(state.__dict__, layout=_layout(), model=model_meta or {}, adapter_only=adapter_only, frozen=frozen)
    return _write(output_dir, state.iteration,
                  lambda: _full_sharded_state(model, optimizer, scheduler, False, data, adapter_only, frozen),
                  config_yaml, meta, keep_last)


def save_weights(output_dir: str, model, config_yaml: str, model_meta: dict) -> str:
    """Write model weights only, as ``iter_0000000`` (converters): start training from it with model.load."""
    meta = dict(TrainState().__dict__, layout=_layout(), model=model_meta, weights_only=True)
    return _write(output_dir, 0, lambda: _model_sharded(model), config_yaml, meta, keep_last=0)


def _write(output_dir: str, iteration: int, sharded_fn, config_yaml: str, meta: dict, keep_last: int) -> str:
    ckpt_dir = checkpoints_dir(output_dir)
    final = os.path.join(ckpt_dir, _iter_name(iteration))
    tmp = os.path.join(ckpt_dir, ".tmp." + _iter_name(iteration))
    rank0 = dist.get_rank() == 0
    if rank0:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)  # left by a save that crashed
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(sharded_fn(), tmp)
    dist.barrier()
    if rank0:
        with open(os.path.join(tmp, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(config_yaml)
        with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _prune(ckpt_dir, keep_last)
    dist.barrier()
    return final


def _prune(ckpt_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_weights(path: str, model) -> str:
    """Load only model weights from a checkpoint (any layout); returns the iter dir used."""
    ckpt = find_checkpoint(path)
    if read_meta(ckpt).get("adapter_only"):
        raise ValueError(f"checkpoint {ckpt} holds LoRA adapters only, not a whole model: export it with "
                         "tools/convert/mcore_to_hf.py (merged), or resume it with tuner=lora and its base")
    sharded = _model_sharded(model)
    _load_model(dist_checkpointing.load(sharded, ckpt), list(sharded), model)
    return ckpt


def _load_model(loaded: dict, keys: List[str], model, adapter_only: bool = False) -> None:
    for key, chunk in zip(keys, model):
        module = _unwrap(chunk)
        missing, unexpected = module.load_state_dict(loaded[key], strict=not adapter_only)
        if adapter_only:  # the frozen base is not in the checkpoint; every trainable parameter must be
            trainable = {n for n, p in module.named_parameters() if p.requires_grad}
            absent = sorted(trainable & set(missing)) + sorted(unexpected)
            if absent:
                raise ValueError(f"adapter checkpoint does not match this model's trainable parameters: {absent[:6]}")


def load_full(ckpt: str, model, optimizer, scheduler, data=None) -> TrainState:
    """Restore weights, optimizer, scheduler, RNG and counters to continue a run.

    Refuses a checkpoint from another layout: the optimizer state is sharded
    by layout (use model.load to start a new run from its weights instead)."""
    meta = read_meta(ckpt)
    if meta.get("weights_only"):
        raise ValueError(f"checkpoint {ckpt} holds model weights only (written by a converter); start a run "
                         f"from it with model.load={ckpt} and a new train.output_dir")
    if meta["layout"] != _layout():
        raise ValueError(
            f"checkpoint {ckpt} was saved with layout {meta['layout']} but this run uses {_layout()}; "
            "resume under the same layout, or start a new run from its weights with model.load="
            f"{ckpt} train.resume=none and a new train.output_dir"
        )
    adapter_only = bool(meta.get("adapter_only"))
    if bool(meta.get("frozen")) != _frozen(model):  # an adapter-only checkpoint is always a frozen one
        saved = "LoRA adapters only" if adapter_only else ("some" if meta.get("frozen") else "no") + \
            " frozen parameters"
        raise ValueError(f"checkpoint {ckpt} was saved with {saved} and this run differs: resume with the same "
                         "train.freeze*/tuner settings")
    sharded = _full_sharded_state(model, optimizer, scheduler, for_loading=True, data=data,
                                  adapter_only=adapter_only, frozen=bool(meta.get("frozen")))
    model_keys = [k for k in sharded if k.startswith("model")]
    loaded = dist_checkpointing.load(sharded, ckpt)
    _load_model(loaded, model_keys, model, adapter_only)
    # fp32 main params are views of the model's leaf params; megatron-core's
    # dp_reshardable loader copies into them outside no_grad (0.16).
    with torch.no_grad():
        optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    _set_rng_state(loaded["rng"])
    if data is not None:
        data.restore(loaded["data"])
    counters = {k: meta[k] for k in ("iteration", "consumed_samples", "epoch")}
    return TrainState(**counters)
