"""JSONL input files: checked to exist (naming the missing one), read as numbered non-empty lines.

Lines are read as bytes with a bounded ``readline`` and decoded one at a time,
so a line that is not UTF-8 is reported with its file and line (not as a
``UnicodeDecodeError`` from deep inside a reader), and a line longer than
``data.max_line_bytes`` is rejected after reading at most that many bytes of
it: a corrupt or binary file with no newline for gigabytes cannot take the
memory of a whole line, let alone the much larger parse and token lists made
from it. Under ``data.on_error=skip`` such lines are skipped and counted like
any other bad row; the rest of an over-long line is then read past in small
chunks. A UTF-8 byte-order mark at the start of a file (Windows editors write
one) is not part of its first line.
"""
from __future__ import annotations

import os
from codecs import BOM_UTF8
from typing import BinaryIO, Iterator, Optional, Sequence, Tuple, Union

from megatron_swift.data.errors import DataError

DEFAULT_MAX_LINE_BYTES = 16 * 2**20  # data.max_line_bytes' default (schema.DataConfig)
LIMIT_KEY = "data.max_line_bytes"
SKIP_HINT = "data.on_error=skip skips such rows"
_SKIP_CHUNK = 2**16  # bytes held at a time while reading past an over-long line


class LineError(ValueError):
    """A line that cannot be used as text: not UTF-8, or longer than the line limit."""


def require_files(paths: Sequence[str]) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(path, None, "data file not found (check data.path)")


def strip_bom(raw: Optional[bytes], at_start: bool) -> Optional[bytes]:
    """``raw`` without a UTF-8 byte-order mark if it is the file's first line (``at_start``)."""
    return raw[len(BOM_UTF8):] if at_start and raw and raw.startswith(BOM_UTF8) else raw


def read_line(f: BinaryIO, max_bytes: int) -> Optional[bytes]:
    """The next line of binary file ``f`` with its newline (``b""`` at the end of the file), reading at most
    ``max_bytes + 1`` bytes; None when the line is longer than ``max_bytes`` (not counting its newline).
    ``f`` is then left inside that line: :func:`skip_rest` reads past it."""
    raw = f.readline(max_bytes + 1)
    if len(raw) > max_bytes and not raw.endswith(b"\n"):
        return None
    return raw


def skip_rest(f: BinaryIO) -> None:
    """Read past the rest of the current line in chunks, so an over-long line is never held whole."""
    while True:
        chunk = f.readline(_SKIP_CHUNK)
        if not chunk or chunk.endswith(b"\n"):
            return


def decode_line(raw: bytes) -> str:
    """``raw`` as text; LineError naming the first byte that is not UTF-8 and its (1-based) column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8") from None


def too_long(max_bytes: int, limit_key: str = LIMIT_KEY) -> LineError:
    """The error for a line over the limit; ``limit_key`` is the setting that raises it."""
    return LineError(f"line is longer than {limit_key}={max_bytes} bytes (not read whole); "
                     f"raise {limit_key} if such lines are meant to be there")


def numbered_lines(f: BinaryIO, max_bytes: int,
                   limit_key: str = LIMIT_KEY) -> Iterator[Tuple[int, Union[str, LineError]]]:
    """(line number, text) of every line of binary file ``f``, empty ones included; a line that is not UTF-8
    or is longer than ``max_bytes`` comes as (line number, LineError). The rest of an over-long line is read
    past (in chunks) only if the caller goes on iterating, so a caller that stops at the error reads no more."""
    line_no = 0
    while True:
        raw = strip_bom(read_line(f, max_bytes), at_start=line_no == 0)
        line_no += 1
        if raw is None:
            yield line_no, too_long(max_bytes, limit_key)
            skip_rest(f)
            continue
        if not raw:
            return
        try:
            text: Union[str, LineError] = decode_line(raw)
        except LineError as e:
            text = e
        yield line_no, text


def bad_line(path: str, line_no: int, error: LineError, on_error: str, counts=None) -> None:
    """Apply data.on_error to a line that cannot be read: raise DataError naming the file and line, or
    (skip) count it in ``counts`` (anything with ``rows`` and ``skipped``, e.g. sft.Counts) as a bad row."""
    if on_error != "skip":
        raise DataError(path, line_no, f"{error} ({SKIP_HINT})")
    if counts is not None:
        counts.rows += 1
        counts.skipped += 1


def jsonl_lines(paths: Sequence[str], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, on_error: str = "error",
                counts=None):
    """(path, line number, line) of every non-empty line of the files; a missing file is named first.

    A line that is not UTF-8 or is longer than ``max_line_bytes`` raises DataError(path, line), or with
    ``on_error="skip"`` is left out and counted in ``counts`` (see :func:`bad_line`)."""
    require_files(paths)
    for path in paths:
        with open(path, "rb") as f:
            for line_no, line in numbered_lines(f, max_line_bytes):
                if isinstance(line, LineError):
                    bad_line(path, line_no, line, on_error, counts)
                elif line.strip():
                    yield path, line_no, line


def line_rules(data_cfg) -> Tuple[int, str]:
    """(data.max_line_bytes, data.on_error) of a data config; configs written by hand (tests, benchmarks)
    may lack them, and get the schema's defaults."""
    return getattr(data_cfg, "max_line_bytes", DEFAULT_MAX_LINE_BYTES), getattr(data_cfg, "on_error", "error")
