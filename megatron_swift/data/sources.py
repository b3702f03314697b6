"""Pretraining sample sources: one long token stream cut into fixed windows.

Documents are tokenized, each followed by the end-of-document token, and
concatenated in file order (as Megatron's GPTDataset does). Sample ``i`` is
``stream[i*S : i*S + S + 1]`` (inputs plus the shifted label), so a dataset of
``T`` tokens has ``(T - 1) // S`` samples and a trailing partial window is
dropped. These JSONL sources are held in memory; large pretraining corpora
go through tools/preprocess_data.py into megatron-core indexed datasets
(data/pretrain.py).
"""
from __future__ import annotations

import json
from typing import List, Optional, Sequence

import numpy as np
import torch

from megatron_swift.data.conversations import RowError
from megatron_swift.data.errors import DataError
from megatron_swift.data.files import DEFAULT_MAX_LINE_BYTES, SKIP_HINT, jsonl_lines, line_rules
from megatron_swift.data.sft import Counts


class TokenWindows(torch.utils.data.Dataset):
    """Fixed windows of ``seq_length + 1`` tokens over one token stream."""

    def __init__(self, stream: np.ndarray, seq_length: int, description: str):
        self.stream = torch.from_numpy(np.ascontiguousarray(stream, dtype=np.int64))
        self.seq_length = seq_length
        self.description = description

    def __len__(self) -> int:
        return max(0, (len(self.stream) - 1) // self.seq_length)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = index * self.seq_length
        return self.stream[start : start + self.seq_length + 1]

    @staticmethod
    def collate(samples: List[torch.Tensor]):
        from megatron_swift.data.sampler import collate

        return collate(samples)


def _text_row(line: str, text_key: str) -> str:
    """The text of one JSONL row; RowError when the row is not JSON or has no string ``text_key``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
        raise RowError(f"row has no string field '{text_key}' (set data.text_key)")
    return row[text_key]


def _read_jsonl(path: str, text_key: str, tokenizer, max_line_bytes: int, on_error: str, counts: Counts) -> List[int]:
    tokens: List[int] = []
    for _, line_no, line in jsonl_lines([path], max_line_bytes, on_error, counts):
        counts.rows += 1
        try:
            text = _text_row(line, text_key)
        except RowError as e:
            if on_error != "skip":
                raise DataError(path, line_no, f"{e} ({SKIP_HINT})") from None
            counts.skipped += 1
            continue
        tokens.extend(tokenizer.encode(text))
        tokens.append(tokenizer.eod)
    return tokens


def jsonl_source(paths: Sequence[str], text_key: str, tokenizer, seq_length: int,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES, on_error: str = "error") -> TokenWindows:
    """``{"text": ...}`` rows from one or more JSONL files; bad rows (not UTF-8, over ``max_line_bytes``, not
    JSON, no text field) raise DataError naming the file and line, or are skipped and counted (on_error=skip)."""
    stream: List[int] = []
    counts = Counts()
    for path in paths:
        stream.extend(_read_jsonl(path, text_key, tokenizer, max_line_bytes, on_error, counts))
    skipped = f" ({counts.rows} rows, {counts.skipped} bad rows skipped)" if counts.skipped else ""
    return TokenWindows(np.asarray(stream, dtype=np.int64), seq_length, f"jsonl:{','.join(paths)}{skipped}")


def mock_source(num_samples: int, vocab_size: int, seq_length: int, seed: int) -> TokenWindows:
    """Random tokens, fixed by the seed: for smoke tests and benchmarks."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, vocab_size, size=num_samples * seq_length + 1, dtype=np.int64)
    return TokenWindows(stream, seq_length, f"mock:{num_samples}")


def build_source(data_cfg, paths: Sequence[str], tokenizer, seq_length: int, seed: int,
                 template_folder: Optional[str] = None, num_samples: Optional[int] = None,
                 cache_dir: Optional[str] = None, stream_rank: Optional[tuple] = None, vision=None):
    """The source named by ``data.source`` over ``paths``; SFT templates default to ``template_folder``'s,
    weighted indexed blends are built with ``num_samples`` and cache their indices in ``cache_dir``;
    ``stream_rank`` = (dp rank, dp size) makes a streaming SFT source for that rank (data.streaming);
    ``vision`` (data.images.VisionData, from the model) is what vision-language rows need (data.source=vl_sft)."""
    if data_cfg.source == "indexed":
        from megatron_swift.data.pretrain import indexed_source

        return indexed_source(paths, data_cfg.weights, tokenizer, seq_length, seed, num_samples, cache_dir)
    if data_cfg.source == "sft" and data_cfg.streaming and stream_rank is not None:
        from megatron_swift.data.streaming import stream_source

        return stream_source(paths, data_cfg, tokenizer, seq_length, template_folder, seed, *stream_rank)
    if data_cfg.source == "vl_sft":
        from megatron_swift.config.validate import ConfigError
        from megatron_swift.data.vl_sft import vl_sft_source

        if vision is None:  # ConfigError: the CLI ends the run with this one line
            raise ConfigError(["data.source=vl_sft needs a vision-language model (e.g. +model=llava or qwen2_5_vl)"])
        return vl_sft_source(paths, data_cfg, tokenizer, seq_length, data_cfg.template, template_folder, vision)
    if data_cfg.source == "sft":
        from megatron_swift.data.sft import sft_source

        return sft_source(paths, data_cfg, tokenizer, seq_length, data_cfg.template, template_folder)
    if data_cfg.source == "jsonl":
        return jsonl_source(paths, data_cfg.text_key, tokenizer, seq_length, *line_rules(data_cfg))
    if data_cfg.source == "mock":
        return mock_source(data_cfg.mock_samples, tokenizer.vocab_size, seq_length, seed)
    raise ValueError(f"data.source={data_cfg.source}: expected jsonl, sft, vl_sft, indexed or mock")
