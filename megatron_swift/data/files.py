"""JSONL input files: checked to exist (naming the missing one), read as numbered non-empty lines."""
from __future__ import annotations

import os
from typing import Sequence

from megatron_swift.data.errors import DataError


def require_files(paths: Sequence[str]) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(path, None, "data file not found (check data.path)")


def jsonl_lines(paths: Sequence[str]):
    """(path, line number, line) of every non-empty line of the files; a missing file is named first."""
    require_files(paths)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield path, line_no, line
