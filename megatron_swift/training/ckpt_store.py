"""Checkpoints on disk: where they are, whether they are complete and intact, and pruning.

Layout of a run directory::

    <output_dir>/checkpoints/iter_0000042/          one complete checkpoint
        megatron_swift.json                        counters, layout, run config and the manifest (written last)
        config.yaml, .metadata, common.pt, ...     megatron-core dist_checkpointing files
    <output_dir>/checkpoints/.tmp.iter_0000050/     a save in progress (never loaded)
    <output_dir>/checkpoints/iter_0000030.corrupt/  a checkpoint that failed verification (kept for inspection)

A checkpoint is *complete* when its ``megatron_swift.json`` exists, parses and
says ``complete``; it is *intact* when every file its manifest lists has the
recorded size and SHA-256. The manifest is made right after the files are
written (each rank hashes the shards it wrote while they are still in the page
cache; rank 0 the shared files), so verifying costs one more read of the
checkpoint at resume time. Pruning removes a checkpoint's marker before its
shards, so a crash half-way through pruning leaves something that is no longer
counted as complete (and is cleaned up by the next prune), never a marker over
missing shards.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Dict, List, Optional

import torch.distributed as dist

from megatron_swift.training.errors import CheckpointError

META = "megatron_swift.json"
ITER_RE = re.compile(r"^iter_(\d{7})$")
_CHUNK = 8 << 20


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_meta(ckpt: str) -> dict:
    """The checkpoint's megatron_swift.json; an unreadable one is a CheckpointError naming it."""
    path = os.path.join(ckpt, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: cannot read {META} ({e.__class__.__name__}: {e})") from None
    if not isinstance(meta, dict) or "iteration" not in meta:
        raise CheckpointError(f"checkpoint {ckpt}: {META} is not a megatron-swift checkpoint record")
    return meta


def _is_complete(ckpt: str) -> bool:
    try:
        meta = read_meta(ckpt)
    except CheckpointError:
        return False
    return meta.get("complete", True)  # records written before manifests existed carry no flag


def complete_checkpoints(ckpt_dir: str) -> List[str]:
    """Complete checkpoint directories, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    names = [n for n in sorted(os.listdir(ckpt_dir))
             if ITER_RE.match(n) and os.path.isfile(os.path.join(ckpt_dir, n, META))]
    return [os.path.join(ckpt_dir, n) for n in names if _is_complete(os.path.join(ckpt_dir, n))]


def incomplete_checkpoints(ckpt_dir: str) -> List[str]:
    """``iter_N`` folders that are not complete checkpoints (empty, no record, a torn or unfinished record): a
    save or prune that did not finish. They are never loaded and the next prune removes them."""
    if not os.path.isdir(ckpt_dir):
        return []
    return [os.path.join(ckpt_dir, n) for n in sorted(os.listdir(ckpt_dir))
            if ITER_RE.match(n) and not _is_complete(os.path.join(ckpt_dir, n))]


def find_checkpoint(path: str) -> str:
    """Accept a run dir, its checkpoints dir or an iter_N dir; return the latest complete iter_N dir."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    for candidate in (checkpoints_dir(path), path):
        found = complete_checkpoints(candidate)
        if found:
            return found[-1]
    raise FileNotFoundError(f"no complete megatron-swift checkpoint under {path}")


# ---------------------------------------------------------------- manifest


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _written_by(name: str, rank: int) -> bool:
    """torch_dist names each rank's shards ``__<rank>_<n>.distcp``; rank 0 writes every other file."""
    match = re.match(r"^__(\d+)_\d+\.distcp$", name)
    return int(match.group(1)) == rank if match else rank == 0


def make_manifest(folder: str) -> Optional[Dict[str, List]]:
    """{file: [size, sha256]} of every file in ``folder`` (collective); complete on rank 0, None elsewhere."""
    rank = dist.get_rank()
    mine = {name: [os.path.getsize(os.path.join(folder, name)), sha256_file(os.path.join(folder, name))]
            for name in sorted(os.listdir(folder))
            if name != META and os.path.isfile(os.path.join(folder, name)) and _written_by(name, rank)}
    parts: List[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    if rank != 0:
        return None
    manifest: Dict[str, List] = {}
    for part in parts:
        manifest.update(part)
    return manifest


def _check_files(ckpt: str, manifest: Dict[str, List], names: List[str]) -> List[str]:
    problems = []
    for name in names:
        path = os.path.join(ckpt, name)
        size, digest = manifest[name]
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{name} has {os.path.getsize(path)} bytes, {size} were written")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its checksum")
    return problems


def _is_manifest(manifest) -> bool:
    return isinstance(manifest, dict) and bool(manifest) and all(
        isinstance(v, list) and len(v) == 2 for v in manifest.values())


def verify(ckpt: str) -> List[str]:
    """What is wrong with ``ckpt`` (empty: intact). Collective: the files are shared out over the ranks and
    every rank returns the same list."""
    try:
        meta = read_meta(ckpt)
    except CheckpointError as e:
        problems = [str(e)]
    else:
        manifest = meta.get("manifest")
        if not _is_manifest(manifest):  # nothing to check the files against: not known to be intact
            problems = [f"{META} has no manifest of its files (size and SHA-256 of each), so they cannot be "
                        "checked"]
        else:
            names = sorted(manifest)
            rank, world = dist.get_rank(), dist.get_world_size()
            problems = _check_files(ckpt, manifest, names[rank::world])
    gathered: List[Optional[list]] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    return sorted({p for part in gathered for p in part})


def quarantine(ckpt: str) -> str:
    """Move a checkpoint that failed verification out of the way (rank 0): it is no longer a candidate for
    resuming nor counted by pruning, and stays on disk for inspection. Returns the new path."""
    target = ckpt.rstrip("/") + ".corrupt"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{ckpt.rstrip('/')}.corrupt{n}"
    os.rename(ckpt, target)
    return target


def prune(ckpt_dir: str, keep_last: int) -> None:
    """Keep the ``keep_last`` newest complete checkpoints (rank 0). Each removal deletes the marker first.
    Leftovers of an interrupted prune (an iter_N folder with no marker) are removed too."""
    if keep_last > 0:
        for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
            os.remove(os.path.join(old, META))
            shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if ITER_RE.match(name) and not os.path.isfile(os.path.join(path, META)):
            shutil.rmtree(path, ignore_errors=True)


def remove_temporaries(ckpt_dir: str) -> List[str]:
    """Remove the ``.tmp.iter_N`` folders of saves that never finished (rank 0, at the start of a run, with the
    run folder locked: no other run can be writing them). Returns their names."""
    if not os.path.isdir(ckpt_dir):
        return []
    stale = sorted(n for n in os.listdir(ckpt_dir) if n.startswith(".tmp.iter_"))
    for name in stale:
        shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    return stale
