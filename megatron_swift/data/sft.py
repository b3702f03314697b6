"""SFT conversations as training rows: chat template, loss mask, truncation, optional packing.

One conversation becomes one sample: the ids of its rendered text and, per
position ``i``, the label ``ids[i+1]`` with a loss mask saying whether that
next token is one the model should learn (``data.loss_on``: every assistant
turn, the last one, or everything; a message's ``"loss": true/false``
overrides). The last position of every sample has no label, so in a packed
row no sample is trained to predict the start of the next.

Rows are ``train.seq_length`` positions: one sample padded at the end, or
with ``data.packing=true`` several samples packed by best-fit decreasing,
with position ids restarting per sample and a segment id per position that
the model turns into per-sample attention (models/attention.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence

import numpy as np
import torch

from megatron_swift.data.conversations import RowError, to_messages
from megatron_swift.data.errors import DataError
from megatron_swift.data.files import jsonl_lines, line_rules
from megatron_swift.data.packing import best_fit_decreasing
from megatron_swift.data.sampler import Batch
from megatron_swift.data.templates import ChatTemplate, TemplateError

LOSS_ON = ("assistant", "last_assistant", "all")
TRUNCATION = ("error", "truncate", "drop")
ON_ERROR = ("error", "skip")


def encode(messages: List[dict], template: ChatTemplate, tokenizer, loss_on: str):
    """(ids, targets): token ids of the rendered conversation and whether each token carries loss."""
    text, spans = template.spans(messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    return np.asarray(ids, dtype=np.int64), loss_targets(messages, spans, offsets, loss_on)


def loss_targets(messages: List[dict], spans, offsets, loss_on: str) -> np.ndarray:
    """Whether each token, covering characters ``offsets`` [(start, end)] of the rendering whose message
    ``spans`` are given, carries loss (data.loss_on, a message's own "loss" flag)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    if loss_on == "all":
        return np.ones(len(offsets), dtype=bool)
    # A token belongs to a message when the characters it covers overlap the message's span: a piece like
    # SentencePiece's "▁Hello" starts on the separator before the reply but carries the reply's text.
    starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    last_assistant = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    targets = np.zeros(len(offsets), dtype=bool)
    for span in spans:
        message = messages[span.index]
        default = message["role"] == "assistant" and (loss_on == "assistant" or span.index == last_assistant)
        if message["loss"] if message["loss"] is not None else default:
            targets |= (starts < span.end) & (ends > span.start)
    return targets


@dataclass
class Counts:
    """What happened to the rows of the files, reported at start."""

    rows: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclass
class _Samples:
    """Encoded samples as parallel lists, one entry per sample (subclasses add per-sample fields)."""

    ids: List[np.ndarray] = field(default_factory=list)
    targets: List[np.ndarray] = field(default_factory=list)

    def append(self, sample: tuple) -> None:
        """Add one sample: a tuple with one value per field, in field order."""
        for f, value in zip(fields(self), sample):
            getattr(self, f.name).append(value)


def read_conversations(paths: Sequence[str], data_cfg, template: ChatTemplate, tokenizer, seq_length: int):
    """Encoded samples of all files and the counts; bad rows raise DataError(file, line) or are skipped."""
    counts = Counts()
    encode_line = line_encoder(data_cfg, template, tokenizer, seq_length, counts)
    return read_samples(paths, data_cfg, encode_line, _Samples(), counts), counts


def read_samples(paths: Sequence[str], data_cfg, encode_line, samples: _Samples, counts: Counts) -> _Samples:
    """``samples`` with the sample ``encode_line(line, path, line_no)`` makes of every kept line of the files."""
    for path, line_no, line in jsonl_lines(paths, *line_rules(data_cfg), counts):
        counts.rows += 1
        encoded = encode_line(line, path, line_no)
        if encoded is not None:
            samples.append(encoded)
    return samples


def _keep_start(side: tuple, seq_length: int) -> tuple:
    """data.truncation=truncate: the first ``seq_length`` tokens of an (ids, targets) side."""
    ids, targets = side
    return ids[:seq_length], targets[:seq_length]


def row_encoder(data_cfg, seq_length: int, counts: Counts, encode_row, subject: str, cut=_keep_start):
    """``encode(line, path, line_no)`` -> the sides ``encode_row(row)`` makes of a JSONL row, or None for a row
    skipped (data.on_error=skip) or dropped (data.truncation); other bad rows raise DataError naming the file and
    line. ``subject`` names the row in messages ("conversation", "pair"). A side is a tuple starting (ids,
    targets); ``cut(side, seq_length)`` truncates one (None: it cannot be cut there, and the row is dropped)."""

    def encode_line(line: str, path: str, line_no: int):
        try:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(f"invalid JSON ({e.msg} at column {e.colno})") from None
            sides = encode_row(row)
            if any(not side[1][1:].any() for side in sides):
                raise RowError(f"the chat template gives this {subject} no tokens that carry loss "
                               "(data.template, data.loss_on)")
        except (RowError, TemplateError) as e:
            if data_cfg.on_error == "skip":
                counts.skipped += 1
                return None
            raise DataError(path, line_no, f"{e} (data.on_error=skip skips such rows)") from None
        longest = max(len(side[0]) for side in sides)
        if longest > seq_length:
            if data_cfg.truncation == "error":
                raise DataError(path, line_no, f"{subject} has {longest} tokens, more than train.seq_length="
                                f"{seq_length} (data.truncation=truncate|drop)")
            cut_sides = [] if data_cfg.truncation == "drop" else [cut(side, seq_length) for side in sides]
            if not cut_sides or any(side is None or not side[1][1:].any() for side in cut_sides):
                counts.dropped += 1  # a truncated sample with nothing left to learn is dropped too
                return None
            sides = cut_sides
            counts.truncated += 1
        return sides

    return encode_line


def line_encoder(data_cfg, template: ChatTemplate, tokenizer, seq_length: int, counts: Counts):
    """``encode(line, path, line_no)`` -> (ids, targets) of one conversation row, or None (see row_encoder)."""
    encode_sides = row_encoder(
        data_cfg, seq_length, counts,
        lambda row: [encode(to_messages(row, data_cfg.format), template, tokenizer, data_cfg.loss_on)],
        "conversation")

    def encode_line(line: str, path: str, line_no: int):
        sides = encode_sides(line, path, line_no)
        return None if sides is None else sides[0]

    return encode_line


def fill_row(samples: Sequence, seq_length: int, pad_id: int) -> dict:
    """One row of ``seq_length`` positions from (ids, targets) samples placed one after another, then padding."""
    S = seq_length
    tokens = np.full(S, pad_id, dtype=np.int64)
    labels = np.full(S, pad_id, dtype=np.int64)
    loss_mask = np.zeros(S, dtype=np.float32)
    positions = np.zeros(S, dtype=np.int64)
    segments = np.full(S, -1, dtype=np.int64)  # -1: padding
    at = 0
    for seg, (ids, targets) in enumerate(samples):
        n = len(ids)
        tokens[at : at + n] = ids
        labels[at : at + n - 1] = ids[1:]
        loss_mask[at : at + n - 1] = targets[1:]  # the last position of a sample predicts nothing
        positions[at : at + n] = np.arange(n)
        segments[at : at + n] = seg
        at += n
    positions[at:] = np.arange(S - at)
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, positions=positions, segments=segments)


class SFTRows(torch.utils.data.Dataset):
    """Training rows of ``seq_length`` positions, each one sample or a pack of samples."""

    def __init__(self, samples: _Samples, seq_length: int, pad_id: int, packing: bool, description: str):
        self.samples, self.seq_length, self.pad_id, self.packing = samples, seq_length, pad_id, packing
        lengths = [len(ids) for ids in samples.ids]
        self.rows = best_fit_decreasing(lengths, seq_length) if packing else [[i] for i in range(len(lengths))]
        fill = sum(lengths) / max(1, len(self.rows) * seq_length)
        self.description = f"{description}, {len(self.rows)} rows of {seq_length} ({100 * fill:.1f} % filled)"

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        samples = [(self.samples.ids[i], self.samples.targets[i]) for i in self.rows[index]]
        return fill_row(samples, self.seq_length, self.pad_id)

    def collate(self, items: List[dict]) -> Batch:
        return self.collate_items(items, self.packing)

    @staticmethod
    def collate_items(items: List[dict], packing: bool) -> Batch:
        stack = {k: torch.from_numpy(np.stack([item[k] for item in items])) for k in items[0]}
        # Unpacked rows are one sample plus trailing padding: the causal mask alone is right for them.
        segments = stack["segments"] if packing else None
        return Batch(stack["tokens"], stack["labels"], stack["loss_mask"], stack["positions"], segments,
                     lengths=(stack["segments"] >= 0).sum(-1))


def blend(parts: List[_Samples], weights: Sequence[float]) -> _Samples:
    """As many samples as all files hold together, drawn from the files in proportion to ``weights``
    (megatron-core's deterministic blending order; a small file is repeated, a large one cut)."""
    from megatron.core.datasets import helpers

    if any(not part.ids for part in parts):
        raise DataError("data.path", None, "a weighted SFT file has no usable conversations")
    total = sum(len(part.ids) for part in parts)
    dataset_index = np.zeros(total, dtype=np.int16)
    sample_index = np.zeros(total, dtype=np.int64)
    norm = [float(w) / sum(weights) for w in weights]
    helpers.build_blending_indices(dataset_index, sample_index, norm, len(parts), total, False)
    out = type(parts[0])()
    for d, k in zip(dataset_index.tolist(), sample_index.tolist()):
        part = parts[d]
        out.append(tuple(getattr(part, f.name)[k % len(part.ids)] for f in fields(part)))
    return out


def read_files(paths: Sequence[str], data_cfg, read):
    """(samples, counts) of all files, ``read(paths)`` giving those of some; with data.weights each file is read
    alone and the files are blended. DataError when no sample is left."""
    if data_cfg.weights:
        per_file = [read([p]) for p in paths]
        samples, counts = blend([s for s, _ in per_file], data_cfg.weights), Counts()
        for _, c in per_file:
            counts = Counts(*(a + b for a, b in zip(counts.__dict__.values(), c.__dict__.values())))
    else:
        samples, counts = read(paths)
    if not samples.ids:
        raise DataError(",".join(paths), None, f"no usable conversations ({counts.rows} rows, {counts.skipped} "
                        f"skipped, {counts.dropped} dropped)")
    return samples, counts


def sft_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_spec: Optional[str],
               template_folder: Optional[str]) -> SFTRows:
    """SFTRows over conversation files, with what was skipped, truncated and dropped in its description."""
    from megatron_swift.data.templates import load_template

    template = load_template(template_spec, template_folder)
    samples, counts = read_files(
        paths, data_cfg, lambda some: read_conversations(some, data_cfg, template, tokenizer, seq_length))
    description = (f"sft:{','.join(paths)} ({counts.rows} rows, template {template.name}: {len(samples.ids)} "
                   f"samples, {counts.skipped} bad rows skipped, {counts.truncated} truncated, {counts.dropped} "
                   f"dropped)")
    return SFTRows(samples, seq_length, tokenizer.pad, data_cfg.packing, description)
