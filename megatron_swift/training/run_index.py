"""``outputs/runs.jsonl``: one line when a run starts and one when it ends, for every run under ``outputs/``.

Run folders are named by what differs (run_dir.run_name) and stamped with their start time, but a folder
name cannot say which command made it or how far it got. The index can: ``start`` lines carry the command
(the overrides as typed, the number of processes), the folder and what was resumed; ``end`` lines the
status (finished, stopped by a signal or the time budget, diverged, failed with an error's kind) and the
last step. Lines are appended (one ``write`` each, small enough to be atomic on a local file system), so
runs on one machine never rewrite each other's lines; rank 0 writes them. Runs with a ``train.output_dir``
outside ``outputs/`` are not indexed (their folder is the user's own).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import torch.distributed as dist

from megatron_swift.training.run_dir import ROOT

INDEX = "runs.jsonl"


def index_path(output_dir: str, root: str = ROOT) -> Optional[str]:
    """``<root>/runs.jsonl`` when ``output_dir`` lies under ``root``, else None."""
    top, folder = os.path.abspath(root), os.path.abspath(output_dir)
    if folder == top or os.path.commonpath([top, folder]) != top:
        return None
    return os.path.join(top, INDEX)


def _append(output_dir: str, record: dict) -> None:
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    path = index_path(output_dir)
    if path is None:
        return
    line = json.dumps(dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), run=output_dir, **record)) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as e:  # the index is a convenience: a read-only outputs/ must not stop training
        print(f"megatron-swift: WARNING: could not add to {path}: {e}", flush=True)


def started(output_dir: str, resumed_from: Optional[str], step: int, total: int) -> None:
    """The run's start line: command, processes, where it resumed from."""
    _append(output_dir, dict(event="start", command=" ".join(sys.argv[1:]),
                             nproc=int(os.environ.get("WORLD_SIZE", "1")), resumed_from=resumed_from,
                             step=step, total_steps=total))


def ended(output_dir: str, status: str, step: int, total: int) -> None:
    """The run's end line: ``finished``, ``stopped by <reason>``, ``diverged`` or ``failed: <error kind>``."""
    _append(output_dir, dict(event="end", status=status, step=step, total_steps=total))
