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
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from megatron_swift.data.conversations import RowError, to_messages
from megatron_swift.data.errors import DataError
from megatron_swift.data.packing import best_fit_decreasing
from megatron_swift.data.sampler import Batch
from megatron_swift.data.templates import ChatTemplate, TemplateError

LOSS_ON = ("assistant", "last_assistant", "all")
TRUNCATION = ("error", "truncate", "drop")
ON_ERROR = ("error", "skip")


def encode(messages: List[dict], template: ChatTemplate, tokenizer, loss_on: str):
    """(ids, targets): token ids of the rendered conversation and whether each token carries loss."""
    text, spans = template.spans(messages)
    ids, starts = tokenizer.encode_with_offsets(text)
    starts = np.asarray(starts, dtype=np.int64)
    if loss_on == "all":
        return np.asarray(ids, dtype=np.int64), np.ones(len(ids), dtype=bool)
    last_assistant = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    targets = np.zeros(len(ids), dtype=bool)
    for span in spans:
        message = messages[span.index]
        default = message["role"] == "assistant" and (loss_on == "assistant" or span.index == last_assistant)
        if message["loss"] if message["loss"] is not None else default:
            targets |= (starts >= span.start) & (starts < span.end)
    return np.asarray(ids, dtype=np.int64), targets


@dataclass
class Counts:
    """What happened to the rows of the files, reported at start."""

    rows: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclass
class _Samples:
    ids: List[np.ndarray] = field(default_factory=list)
    targets: List[np.ndarray] = field(default_factory=list)


def read_conversations(paths: Sequence[str], data_cfg, template: ChatTemplate, tokenizer, seq_length: int):
    """Encoded samples of all files and the counts; bad rows raise DataError(file, line) or are skipped."""
    samples, counts = _Samples(), Counts()
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(path, None, "data file not found (check data.path)")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    counts.rows += 1
                    _add_row(line, path, line_no, data_cfg, template, tokenizer, seq_length, samples, counts)
    return samples, counts


def _add_row(line, path, line_no, data_cfg, template, tokenizer, seq_length, samples, counts) -> None:
    try:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RowError(f"invalid JSON ({e.msg} at column {e.colno})") from None
        ids, targets = encode(to_messages(row, data_cfg.format), template, tokenizer, data_cfg.loss_on)
        if not targets[1:].any():
            raise RowError("the chat template gives this conversation no tokens that carry loss (data.template, "
                           "data.loss_on)")
    except (RowError, TemplateError) as e:
        if data_cfg.on_error == "skip":
            counts.skipped += 1
            return
        raise DataError(path, line_no, f"{e} (data.on_error=skip skips such rows)") from None
    if len(ids) > seq_length:
        if data_cfg.truncation == "error":
            raise DataError(path, line_no, f"conversation has {len(ids)} tokens, more than train.seq_length="
                            f"{seq_length} (data.truncation=truncate|drop)")
        if data_cfg.truncation == "drop" or not targets[1:seq_length].any():
            counts.dropped += 1  # a truncated sample with nothing left to learn is dropped too
            return
        ids, targets = ids[:seq_length], targets[:seq_length]
        counts.truncated += 1
    samples.ids.append(ids)
    samples.targets.append(targets)


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
        S = self.seq_length
        tokens = np.full(S, self.pad_id, dtype=np.int64)
        labels = np.full(S, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(S, dtype=np.float32)
        positions = np.zeros(S, dtype=np.int64)
        segments = np.full(S, -1, dtype=np.int64)  # -1: padding
        at = 0
        for seg, sample in enumerate(self.rows[index]):
            ids, targets = self.samples.ids[sample], self.samples.targets[sample]
            n = len(ids)
            tokens[at : at + n] = ids
            labels[at : at + n - 1] = ids[1:]
            loss_mask[at : at + n - 1] = targets[1:]  # the last position of a sample predicts nothing
            positions[at : at + n] = np.arange(n)
            segments[at : at + n] = seg
            at += n
        positions[at:] = np.arange(S - at)
        return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, positions=positions, segments=segments)

    def collate(self, items: List[dict]) -> Batch:
        stack = {k: torch.from_numpy(np.stack([item[k] for item in items])) for k in items[0]}
        # Unpacked rows are one sample plus trailing padding: the causal mask alone is right for them.
        segments = stack["segments"] if self.packing else None
        return Batch(stack["tokens"], stack["labels"], stack["loss_mask"], stack["positions"], segments)


def sft_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_spec: Optional[str],
               template_folder: Optional[str]) -> SFTRows:
    """SFTRows over conversation files, with what was skipped, truncated and dropped in its description."""
    from megatron_swift.data.templates import load_template

    if not hasattr(tokenizer, "encode_with_offsets"):
        raise DataError(str(paths[0]) if paths else "data.path", None, "SFT needs an HF tokenizer (tokenizer.json) "
                        "or the byte tokenizer; SentencePiece models are not supported for SFT yet")
    template = load_template(template_spec, template_folder)
    samples, counts = read_conversations(paths, data_cfg, template, tokenizer, seq_length)
    if not samples.ids:
        raise DataError(",".join(paths), None, f"no usable conversations ({counts.rows} rows, {counts.skipped} "
                        f"skipped, {counts.dropped} dropped)")
    description = (f"sft:{','.join(paths)} ({counts.rows} rows, template {template.name}: {len(samples.ids)} "
                   f"samples, {counts.skipped} bad rows skipped, {counts.truncated} truncated, {counts.dropped} "
                   f"dropped)")
    return SFTRows(samples, seq_length, getattr(tokenizer, "pad", tokenizer.eod), data_cfg.packing, description)
