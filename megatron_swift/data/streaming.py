"""SFT rows read lazily from JSONL files too large to index up front (``data.streaming=true``).

Each data-parallel rank reads its own lines (the ``j``-th non-empty line of
the files belongs to rank ``j % dp``), so ranks see disjoint samples without
talking to each other. Lines pass through a seeded shuffle buffer
(``data.stream_buffer`` lines), are encoded like any SFT row (template, loss
mask, truncation, bad-row policy), and are packed ``data.pack_window`` samples
at a time by best-fit decreasing (or used one per row). After the last line
the files are read again (the next epoch).

Resume: ``state()`` is the reader position (file, byte offset, line counters),
the buffered and not-yet-consumed lines as (file, offset, line) references,
and the shuffle RNG; it is saved per rank with each checkpoint and
``restore()`` re-reads those few lines, so a resumed run continues with
exactly the rows an uninterrupted run would have used next.
"""
from __future__ import annotations

import collections
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_swift.data.files import (DEFAULT_MAX_LINE_BYTES, LineError, bad_line, decode_line, line_rules, read_line,
                                       require_files, skip_rest, strip_bom, too_long)
from megatron_swift.data.packing import best_fit_decreasing
from megatron_swift.data.sft import Counts, SFTRows, fill_row, line_encoder

Ref = Tuple[int, int, int]  # (file index, byte offset, line number)


class StreamingRows:
    """An endless source of SFT rows for one data-parallel rank."""

    def __init__(self, paths: Sequence[str], encode_line, seq_length: int, pad_id: int, packing: bool,
                 dp_rank: int, dp_size: int, seed: int, buffer_size: int, pack_window: int,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, on_error: str = "error"):
        self.paths, self.encode_line = list(paths), encode_line
        self.max_line_bytes, self.on_error = max_line_bytes, on_error  # data.max_line_bytes, data.on_error
        self.seq_length, self.pad_id, self.packing = seq_length, pad_id, packing
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.buffer_size, self.pack_window = max(1, buffer_size), max(1, pack_window)
        self.rng = random.Random(seed + 1000 * dp_rank)
        self.reader = dict(epoch=0, file=0, offset=0, line=0, seen=0)  # seen: non-empty lines so far (all ranks)
        self.buffer: List[Tuple[Ref, str]] = []
        self.pending: collections.deque = collections.deque()  # rows: lists of (ref, ids, targets)
        self.description = (f"sft stream:{','.join(self.paths)} (rank {dp_rank} of {dp_size} reads every "
                            f"{dp_size}th line, shuffle buffer {self.buffer_size}, "
                            f"{'packed ' + str(self.pack_window) + ' at a time' if packing else 'one per row'})")

    # -- reading ---------------------------------------------------------------------------------------

    def _next_line(self) -> Optional[Tuple[Ref, str]]:
        """This rank's next (ref, text), or None at the end of the files (the epoch). Lines are read with a
        bounded readline; only this rank's lines are decoded, and a bad one of them (not UTF-8, over
        data.max_line_bytes) raises DataError or is passed over (data.on_error=skip)."""
        r = self.reader
        while r["file"] < len(self.paths):
            with open(self.paths[r["file"]], "rb") as f:
                f.seek(r["offset"])
                while True:
                    raw = strip_bom(read_line(f, self.max_line_bytes), at_start=r["offset"] == 0)
                    if raw == b"":
                        break
                    ref = (r["file"], r["offset"], r["line"] + 1)
                    r["line"] += 1
                    if raw is not None and not raw.strip():
                        r["offset"] = f.tell()
                        continue
                    # An over-long line is a non-empty line too: it keeps its place in the rank rotation.
                    r["seen"] += 1
                    mine = (r["seen"] - 1) % self.dp_size == self.dp_rank
                    text = self._line_text(raw, ref, self.on_error) if mine else None
                    if raw is None:
                        skip_rest(f)
                    r["offset"] = f.tell()
                    if text is not None:
                        return ref, text
            r.update(file=r["file"] + 1, offset=0, line=0)
        return None

    def _line_text(self, raw: Optional[bytes], ref: Ref, on_error: str) -> Optional[str]:
        """The text of a line read by read_line (None: over the limit); a bad line raises DataError naming the
        file and line, or gives None under on_error=skip."""
        try:
            if raw is None:
                raise too_long(self.max_line_bytes)
            return decode_line(raw)
        except LineError as e:
            bad_line(self.paths[ref[0]], ref[2], e, on_error)
            return None

    def _read(self, ref: Ref) -> str:
        """The line at ``ref`` again (restore). It was read fine before, so a bad line now is an error."""
        with open(self.paths[ref[0]], "rb") as f:
            f.seek(ref[1])
            raw = strip_bom(read_line(f, self.max_line_bytes), at_start=ref[1] == 0)
            return self._line_text(raw, ref, "error")

    def _next_sample(self):
        """(ref, ids, targets) through the shuffle buffer; starts the next epoch when the files are done."""
        while True:
            while len(self.buffer) < self.buffer_size:
                item = self._next_line()
                if item is None:
                    break
                self.buffer.append(item)
            if not self.buffer:
                if self.reader["seen"] == 0:
                    raise ValueError(f"no lines for data-parallel rank {self.dp_rank} in {self.paths}")
                self.reader = dict(epoch=self.reader["epoch"] + 1, file=0, offset=0, line=0, seen=0)
                continue
            at = self.rng.randrange(len(self.buffer))
            self.buffer[at], self.buffer[-1] = self.buffer[-1], self.buffer[at]
            ref, text = self.buffer.pop()
            encoded = self.encode_line(text, self.paths[ref[0]], ref[2])
            if encoded is not None:  # None: skipped or dropped by data.on_error / data.truncation
                return (ref,) + encoded

    def _refill(self) -> None:
        samples = [self._next_sample() for _ in range(self.pack_window if self.packing else 1)]
        if self.packing:
            rows = best_fit_decreasing([len(s[1]) for s in samples], self.seq_length)
            self.pending.extend([samples[i] for i in row] for row in rows)
        else:
            self.pending.append(samples)

    # -- rows ------------------------------------------------------------------------------------------

    def next_rows(self, count: int) -> List[dict]:
        """The next ``count`` rows of this rank, as SFTRows items."""
        out = []
        for _ in range(count):
            if not self.pending:
                self._refill()
            row = self.pending.popleft()
            out.append(fill_row([(ids, targets) for _, ids, targets in row], self.seq_length, self.pad_id))
        return out

    def collate(self, items: List[dict]):
        return SFTRows.collate_items(items, self.packing)

    # -- checkpointing ---------------------------------------------------------------------------------

    def state(self) -> dict:
        return dict(reader=dict(self.reader), buffer=[ref for ref, _ in self.buffer],
                    pending=[[s[0] for s in row] for row in self.pending], rng=self.rng.getstate())

    def restore(self, state: dict) -> None:
        self.reader = dict(state["reader"])
        self.buffer = [(tuple(ref), self._read(ref)) for ref in state["buffer"]]
        self.pending = collections.deque()
        for row in state["pending"]:
            samples = []
            for ref in row:
                ids, targets = self.encode_line(self._read(ref), self.paths[ref[0]], ref[2])
                samples.append((tuple(ref), np.asarray(ids), np.asarray(targets)))
            self.pending.append(samples)
        self.rng.setstate(_as_tuple(state["rng"]))


def _as_tuple(value):
    """random.Random state back from a checkpoint (lists where tuples were)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def stream_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_folder: Optional[str],
                  seed: int, dp_rank: int, dp_size: int):
    """A StreamingRows over conversation files for one data-parallel rank (data.streaming=true)."""
    from megatron_swift.data.templates import load_template

    require_files(paths)
    template = load_template(data_cfg.template, template_folder)
    encode_line = line_encoder(data_cfg, template, tokenizer, seq_length, Counts())
    return StreamingRows(paths, encode_line, seq_length, tokenizer.pad, data_cfg.packing,
                         dp_rank, dp_size, seed, data_cfg.stream_buffer, data_cfg.pack_window,
                         *line_rules(data_cfg))
