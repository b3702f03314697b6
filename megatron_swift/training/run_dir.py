"""Which folder a run writes to, and which checkpoint it continues from.

One run, one folder. Without ``train.output_dir`` a run gets
``outputs/<model>-<task>-<data>[-<tuner>][-<layout>]/<start time>`` (run_name says how
each part is written; outputs/runs.jsonl, run_index, lists each run's command and
outcome); the start time (rank 0's clock, shared with every rank) makes each new
run its own folder, so commands never collide. ``train.resume=auto`` then
continues the newest unfinished run under that name whose stored identity
(resume_check.identity: every setting but train.output_dir/resume, the data
files' contents and the layout) is this command's; any other command, another
train.lr included, starts a new folder. With ``train.output_dir`` set, the run is that
folder: auto resumes its latest checkpoint (after the resume check), as before.

Candidates are verified before use (ckpt_store.verify): a damaged checkpoint is
reported by name, moved aside (``iter_N.corrupt``) and the previous intact one
is used.

Rank 0 locks the chosen folder as soon as it is chosen (if it exists) and holds
the lock for the whole run (run_lock): a second run aimed at a folder in use
stops with one line naming the holder, before it reads or moves anything there.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist

from megatron_swift.config.validate import ConfigError
from megatron_swift.training import ckpt_store, run_lock
from megatron_swift.training.errors import CheckpointError

ROOT = "outputs"


@dataclass
class RunChoice:
    """Where this run writes, and the checkpoint it resumes (None: from the start)."""

    output_dir: str
    resume_from: Optional[str]
    note: str  # one line for the log: new run, or what is resumed


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name).strip("_") or "run"


def run_name(cfg, world: Optional[int] = None) -> str:
    """``<model>-<task>-<data>[-<tuner>][-<layout>]``: what makes a command's runs distinct at a glance.

    The model is ``hf_<folder>`` for ``model.pretrained``, ``from_<folder>`` for ``model.load`` and
    ``<family>-<size>`` for new weights, so a folder named like a family never reads as one. A tuner other
    than full training and every parallel degree above 1 (``tp2``, ``pp2``, ``cp2``, ``ep2``, ``dp2`` with
    ``world`` processes) are appended: runs of one command under other layouts or tuners get their own names.
    """
    if cfg.model.pretrained:
        model = "hf_" + os.path.basename(os.path.normpath(cfg.model.pretrained))
    elif cfg.model.load:
        model = "from_" + os.path.basename(os.path.normpath(cfg.model.load))
    elif cfg.model.get("llm"):  # a VLM composed from an HF LLM and a vision encoder: named after the LLM
        model = f"{cfg.model.family}-{os.path.basename(os.path.normpath(cfg.model.llm))}"
    else:
        model = f"{cfg.model.family}-{cfg.model.size}"
    task = cfg.task.name if cfg.task.name != "lm" else ("sft" if cfg.data.source in ("sft", "vl_sft") else "pt")
    paths = list(cfg.data.path)
    if cfg.data.source == "mock" or not paths:
        data = cfg.data.source
    else:
        data = os.path.splitext(os.path.basename(os.path.normpath(paths[0])))[0]
        data += f"+{len(paths) - 1}" if len(paths) > 1 else ""
    parts = [model, task, data]
    if cfg.tuner.name != "none":
        parts.append(cfg.tuner.name)
    layout = _layout(cfg.parallel, world)
    if layout:
        parts.append(layout)
    return "-".join(_safe(part) for part in parts)


def _layout(par, world: Optional[int]) -> str:
    """``tp2_dp2``-style: the parallel degrees above 1 (data-parallel only when ``world`` is known)."""
    dp = world // (par.tp * par.pp * par.cp) if world else 1
    degrees = (("tp", par.tp), ("pp", par.pp), ("cp", par.cp), ("ep", par.ep), ("dp", dp))
    return "_".join(f"{name}{size}" for name, size in degrees if size and size > 1)


def new_run_dir(cfg, world: Optional[int] = None, root: str = ROOT) -> str:
    """A fresh folder name under ``outputs/<run name>/`` from this process's clock (``world``: run_name's processes)."""
    base = os.path.join(root, run_name(cfg, world))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join(base, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(base, f"{stamp}-{n}")
    return path


def _unfinished_match(base: str, identity: dict) -> Optional[str]:
    """The newest run folder under ``base`` with the same identity whose last checkpoint is before its end."""
    if not os.path.isdir(base):
        return None
    for name in sorted(os.listdir(base), reverse=True):
        found = ckpt_store.complete_checkpoints(ckpt_store.checkpoints_dir(os.path.join(base, name)))
        if not found:
            continue
        try:
            meta = ckpt_store.read_meta(found[-1])
        except CheckpointError:
            continue
        if meta.get("identity") == identity and meta["iteration"] < meta.get("total_iters", 0):
            return os.path.join(base, name)
    return None


def _explicit(cfg, output_dir: str) -> RunChoice:
    existing = ckpt_store.complete_checkpoints(ckpt_store.checkpoints_dir(output_dir))
    mode = cfg.train.resume
    if mode == "none":
        if existing:
            raise ConfigError([f"train.resume=none but {output_dir} already holds checkpoints "
                               f"({os.path.basename(existing[-1])}); use train.resume=auto to continue, or a new "
                               "train.output_dir"])
        return RunChoice(output_dir, None, f"run folder {output_dir} (new run)")
    if mode != "auto":
        return _from_path(mode, output_dir)
    if existing and ckpt_store.read_meta(existing[-1]).get("weights_only"):
        raise ConfigError([f"{output_dir} holds converted weights, not a run to resume; train from them with "
                           f"model.load={output_dir} and a new train.output_dir"])
    if not existing:
        return RunChoice(output_dir, None, f"run folder {output_dir} (new run)")
    return RunChoice(output_dir, output_dir, f"run folder {output_dir} (continuing it)")


def _from_path(path: str, output_dir: Optional[str]) -> RunChoice:
    try:
        ckpt = ckpt_store.find_checkpoint(path)
    except FileNotFoundError as e:
        raise ConfigError([f"train.resume={path}: {e}"]) from None
    run = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    output_dir = output_dir or run  # continuing a run writes into that run's folder
    return RunChoice(output_dir, ckpt, f"run folder {output_dir} (resuming {ckpt})")


def decide(cfg, identity: dict) -> RunChoice:
    """Rank 0 chooses (clock, folder listing), every rank gets the same answer (collective)."""
    choice: List[object] = [None]
    if dist.get_rank() == 0:
        try:
            choice[0] = _locked(_decide_here(cfg, identity))
        except ConfigError as e:
            choice[0] = e
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], ConfigError):
        raise choice[0]
    return choice[0]


def claim(output_dir: str, printer=print) -> None:
    """Create the run folder, lock it if that did not happen when it was chosen (it did not exist yet) and record
    this run as its holder: from here on the run writes there (collective; rank 0 holds the lock)."""
    outcome: List[object] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = run_lock.claim(output_dir)
        except ConfigError as e:  # two runs created the same new folder: the second one stops here
            outcome[0] = e
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], ConfigError):
        raise outcome[0]
    if outcome[0]:
        printer(outcome[0])


def _locked(choice: RunChoice) -> RunChoice:
    """The choice, its folder locked by this process (run_lock), with any warning about locking in its note."""
    warning = run_lock.acquire(choice.output_dir)
    return RunChoice(choice.output_dir, choice.resume_from, choice.note + (f"\n{warning}" if warning else ""))


def _decide_here(cfg, identity: dict) -> RunChoice:
    if cfg.train.output_dir:
        return _explicit(cfg, cfg.train.output_dir)
    if cfg.train.resume not in ("auto", "none"):
        return _from_path(cfg.train.resume, None)
    world = dist.get_world_size()
    if cfg.train.resume == "auto":
        match = _unfinished_match(os.path.join(ROOT, run_name(cfg, world)), identity)
        if match:
            return RunChoice(match, match, f"run folder {match} (continuing this command's unfinished run)")
    path = new_run_dir(cfg, world)
    return RunChoice(path, None, f"run folder {path} (new run)")


def report_incomplete(output_dir: str, printer=print) -> None:
    """Say which ``iter_N`` folders of the run are not complete checkpoints (and so are passed over)."""
    for folder in ckpt_store.incomplete_checkpoints(ckpt_store.checkpoints_dir(output_dir)):
        printer(f"megatron-swift: WARNING: {folder} is not a complete checkpoint (no finished "
                f"{ckpt_store.META}: a save or prune that did not finish); it is not used and the next save "
                "removes it")


def intact_checkpoint(choice: RunChoice, printer=print, verify: bool = True) -> Optional[str]:
    """The checkpoint to load: the newest intact one the choice points at (collective). Damaged ones are
    reported by name and moved aside; an explicitly named damaged checkpoint is an error. ``verify=False``
    (train.verify_checkpoints) trusts the newest complete one without reading it."""
    if choice.resume_from is None:
        return None
    if not verify:
        return ckpt_store.find_checkpoint(choice.resume_from)
    named = os.path.isfile(os.path.join(choice.resume_from, ckpt_store.META))
    candidates = [choice.resume_from] if named else list(reversed(
        ckpt_store.complete_checkpoints(ckpt_store.checkpoints_dir(choice.resume_from))))
    damaged = []
    for ckpt in candidates:
        problems = ckpt_store.verify(ckpt)
        if not problems:
            if damaged:
                printer(f"megatron-swift: WARNING: resuming from {ckpt}, the newest intact checkpoint "
                        f"(skipped: {', '.join(damaged)})")
            return ckpt
        if named:
            raise CheckpointError(f"checkpoint {ckpt} is damaged: {'; '.join(problems[:4])}; resume from an "
                                  "earlier one with train.resume=<its path>")
        moved = ckpt_store.quarantine(ckpt) if dist.get_rank() == 0 else ckpt + ".corrupt"
        dist.barrier()
        printer(f"megatron-swift: WARNING: checkpoint {ckpt} is damaged ({'; '.join(problems[:4])}); moved to "
                f"{moved}, trying the previous one")
        damaged.append(os.path.basename(ckpt))
    if damaged:
        raise CheckpointError(f"no intact checkpoint left in {choice.output_dir} (damaged: {', '.join(damaged)})")
    return None
