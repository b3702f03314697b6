"""metrics.jsonl holds one row per step, the one that counts.

A resumed run trains the steps after its checkpoint again. Their rows from before the interruption are
moved, when the run resumes, to ``metrics.redone.jsonl`` (appended, in order, each with ``"redone": true``)
so that metrics.jsonl never holds two rows of one step and a reader needs no rule to pick one. A line cut
off by the interruption (not JSON) goes there too, as it is.
"""
from __future__ import annotations

import json
import os
from typing import List, TextIO, Tuple

METRICS = "metrics.jsonl"
REDONE = "metrics.redone.jsonl"


def _split(lines: List[str], resumed_at: int) -> Tuple[List[str], List[str]]:
    kept, redone = [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            redone.append(line.rstrip("\n"))
            continue
        if isinstance(row, dict) and row.get("iteration", 0) > resumed_at:
            redone.append(json.dumps(dict(row, redone=True)))
        else:
            kept.append(line.rstrip("\n"))
    return kept, redone


def open_metrics(output_dir: str, resumed_at: int) -> TextIO:
    """metrics.jsonl of ``output_dir`` for appending, rows of steps after ``resumed_at`` moved out first."""
    path = os.path.join(output_dir, METRICS)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            kept, redone = _split(f.readlines(), resumed_at)
        if redone:
            with open(os.path.join(output_dir, REDONE), "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in redone))
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, path)  # whole or not at all
    return open(path, "a", encoding="utf-8")
