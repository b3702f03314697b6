"""What a resume must agree with: the settings that decide the data order and the model, stored with every
checkpoint and compared when a run continues.

Three kinds of settings (``settings()`` returns them as one dict):

- ``data`` and ``files``: everything that decides which samples come at which
  step (global batch, sequence length, seed, the files and a fingerprint of
  all their bytes (training/fingerprint.py: one read per file, then cached),
  packing, ...). The data position is a function of the step
  and these, so a change would silently skip or repeat data: refused.
- ``model``: the architecture, the objective and the tuner: refused, with the
  key that differs (instead of a shape error from inside torch).
- ``schedule``: learning rate, its schedule and the optimizer's
  hyperparameters: a change is applied (the config in force wins; see
  checkpoint._config_hyperparameters and the scheduler override in optim.py)
  and reported; a VLM part's own learning rate (train.vision_lr /
  projector_lr) too, but set where it was unset or the reverse is refused
  (an optimizer parameter group more or less).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

from omegaconf import OmegaConf

from megatron_swift.training import fingerprint

# Settings (config keys) that decide the order and content of the samples.
_DATA_KEYS = ("train.global_batch_size", "train.seq_length", "train.seed", "data.source", "data.path",
              "data.weights", "data.packing", "data.streaming", "data.shuffle", "data.text_key", "data.format",
              "data.template", "data.truncation", "data.on_error", "data.tokenizer", "data.mock_samples",
              "data.stream_buffer", "data.pack_window", "data.max_line_bytes")
# Settings of the optimisation that a resumed run may change.
_SCHEDULE_KEYS = ("train.lr", "train.min_lr", "train.lr_warmup_iters", "train.lr_decay_iters",
                  "train.lr_decay_style", "train.weight_decay", "train.adam_beta1", "train.adam_beta2",
                  "train.adam_eps", "train.clip_grad", "train.train_iters", "train.max_epochs")
# A VLM part's own learning rate: a new value is applied like train.lr (the config's max/min lr win when the
# optimizer state loads: checkpoint._config_hyperparameters), but setting or unsetting one adds or removes an
# optimizer parameter group, whose saved state would not line up: refused.
_PART_LR_KEYS = ("train.vision_lr", "train.projector_lr")


def _data_files(cfg) -> List[str]:
    suffixes = (".bin", ".idx") if cfg.data.source == "indexed" else ("",)
    return [p + s for p in cfg.data.path for s in suffixes if os.path.isfile(p + s)]


def settings(cfg, arch) -> Dict[str, dict]:
    """The settings a resume is checked against (stored in each checkpoint's record)."""
    def plain(key):
        value = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

    model = {"model.family": arch.family.name, **{f"model.{k}": v for k, v in arch.plain().items()},
             "task.name": cfg.task.name, "tuner.name": cfg.tuner.name}
    if cfg.tuner.name == "lora":  # the frozen base is read again from here on every resume
        model.update({"model.pretrained": cfg.model.pretrained, "model.load": cfg.model.load})
    from megatron_swift.tasks import task_class

    # A task may name its own settings that decide which samples come when (GRPO: the group size, ...).
    data_keys = _DATA_KEYS + tuple(f"task.{k}" for k in getattr(task_class(cfg.task.name), "data_keys", ()))
    out = {
        "data": {key: plain(key) for key in data_keys},
        "files": fingerprint.fingerprints(_data_files(cfg)),
        "model": model,
        "schedule": {key: plain(key) for key in _SCHEDULE_KEYS + _PART_LR_KEYS},
    }
    return json.loads(json.dumps(out))  # as a checkpoint record holds it (lists, not tuples), so == compares


# Settings that say where a run is, not what it is: the same command continues its run whatever they say.
_NOT_IDENTITY = ("output_dir", "resume")


def identity(cfg, run_settings: dict, world: int) -> dict:
    """What makes two commands the same run (train.resume=auto with the default output folder continues only a
    run with the same identity): every setting but train.output_dir/train.resume, the data files' contents and
    the number of ranks. A command with another learning rate is another command, so another run; a schedule
    change is applied to a run only when it is named (train.output_dir, or train.resume=<checkpoint>)."""
    par = cfg.parallel
    layout = {"world": world, "tp": par.tp, "pp": par.pp, "vpp": par.vpp or 1, "cp": par.cp, "ep": par.ep,
              "etp": par.etp, "distributed_optimizer": par.distributed_optimizer}
    every = OmegaConf.to_container(cfg, resolve=True)
    every["train"] = {k: v for k, v in every["train"].items() if k not in _NOT_IDENTITY}
    return json.loads(json.dumps({"data": run_settings["data"], "files": run_settings["files"],
                                  "model": run_settings["model"], "layout": layout, "config": every}))


def _diff(saved: dict, now: dict) -> List[Tuple[str, object, object]]:
    return [(k, saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]


def compare(saved: dict, now: dict) -> Tuple[List[str], List[str]]:
    """(refusals, applied changes), each a list of ``key: old -> new`` lines."""
    refused = [f"{k}: {a} -> {b}" for part in ("data", "model") for k, a, b in _diff(saved.get(part, {}),
                                                                                        now[part])]
    refused += [f"data file {k}: " + ("new" if a is None else "gone" if b is None else "contents changed")
                for k, a, b in _diff(saved.get("files", {}), now["files"])]
    schedule = _diff(saved.get("schedule", {}), now["schedule"])
    groups = [(k, a, b) for k, a, b in schedule if k in _PART_LR_KEYS and (a is None) != (b is None)]
    why = {True: "adds an optimizer parameter group the checkpoint has no state for",
           False: "removes an optimizer parameter group the checkpoint has state for"}
    refused += [f"{k}: {a} -> {b} ({why[a is None]})" for k, a, b in groups]
    applied = [f"{k}: {a} -> {b}" for k, a, b in schedule if (k, a, b) not in groups]
    return refused, applied


def refusal_message(ckpt: str, refused: List[str]) -> str:
    return (f"cannot resume from {ckpt}: settings that decide the data order or the model changed since it "
            f"was saved ({'; '.join(refused)}). Put them back to continue this run, or start a new run (a new "
            f"train.output_dir; model.load={ckpt} starts from its weights)")
