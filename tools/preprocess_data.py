"""JSONL text -> megatron-core indexed dataset (``<prefix>.bin`` + ``<prefix>.idx``) for ``data=pretrain``.

    python tools/preprocess_data.py --input corpus.jsonl [more.jsonl ...] --output-prefix /data/corpus \\
        --tokenizer /ckpt/Qwen3-8B [--text-key text] [--workers 8]

Each row's text is tokenized in a pool of worker processes and written as one
document followed by the end-of-document token (so GPTDataset's windows join
documents the way Megatron-LM's do). A progress line (documents, tokens/s,
MB/s) goes to stderr. Lines that are not UTF-8 or are longer than
--max-line-bytes (never read whole), and rows that are not JSON objects with a
string text field, stop the run with the file and line; nothing is left under
the prefix then.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool
from typing import Iterator, List, Optional, Tuple, Union

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_swift.data.files import DEFAULT_MAX_LINE_BYTES, LineError, numbered_lines  # noqa: E402

_TOKENIZER = None  # one per worker process


def _init_worker(spec: str) -> None:
    global _TOKENIZER
    from megatron_swift.data.tokenizer import build_tokenizer

    _TOKENIZER = build_tokenizer(spec)


def _encode(job: Tuple[str, int, Union[str, Exception], str]) -> Tuple[Optional[List[int]], Optional[str], int, int]:
    """(ids with eod, error, line number, bytes) for one JSONL line (or the error that line was read with)."""
    path, line_no, line, key = job
    if isinstance(line, Exception):  # not UTF-8 or over --max-line-bytes (see _lines)
        return None, f"{path}:{line_no}: {line}", line_no, 0
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})", line_no, len(line)
    if not isinstance(row, dict) or not isinstance(row.get(key), str):
        return None, f"{path}:{line_no}: row has no string field '{key}' (--text-key)", line_no, len(line)
    return _TOKENIZER.encode(row[key]) + [_TOKENIZER.eod], None, line_no, len(line)


def _lines(paths: List[str], key: str, max_line_bytes: int) -> Iterator[Tuple[str, int, Union[str, Exception], str]]:
    """Jobs for the non-empty lines, read with a bounded readline. A line that is not UTF-8 or is over
    ``max_line_bytes`` is handed on as its error (it stops the run) and nothing after it is read."""
    for path in paths:
        with open(path, "rb") as f:
            for line_no, line in numbered_lines(f, max_line_bytes, limit_key="--max-line-bytes"):
                if isinstance(line, LineError):
                    yield path, line_no, line, key
                    return
                if line.strip():
                    yield path, line_no, line, key


def preprocess(inputs: List[str], prefix: str, tokenizer: str, key: str = "text", workers: int = 1,
               report_every_s: float = 5.0, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> dict:
    """Write ``prefix``.bin/.idx; returns counts (documents, tokens, seconds)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_swift.data.tokenizer import build_tokenizer

    for path in inputs:
        if not os.path.isfile(path):
            raise SystemExit(f"input not found: {path}")
    vocab = build_tokenizer(tokenizer).vocab_size
    dtype = np.uint16 if vocab < 65500 else np.int32  # megatron-core's choice by vocabulary size
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=dtype)
    docs = tokens = nbytes = 0
    start = last = time.perf_counter()
    try:
        with Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
            for ids, error, _, size in pool.imap(_encode, _lines(inputs, key, max_line_bytes), chunksize=64):
                if error:
                    raise SystemExit(f"megatron-swift: error: {error}")
                builder.add_document(np.asarray(ids), [len(ids)])
                docs, tokens, nbytes = docs + 1, tokens + len(ids), nbytes + size
                if time.perf_counter() - last > report_every_s:
                    last = time.perf_counter()
                    _progress(docs, tokens, nbytes, last - start)
        builder.finalize(prefix + ".idx.tmp")
    except BaseException:
        for ext in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(prefix + ext):
                os.remove(prefix + ext)
        raise
    os.replace(prefix + ".bin.tmp", prefix + ".bin")
    os.replace(prefix + ".idx.tmp", prefix + ".idx")
    seconds = time.perf_counter() - start
    _progress(docs, tokens, nbytes, seconds)
    return {"documents": docs, "tokens": tokens, "seconds": seconds}


def _progress(docs: int, tokens: int, nbytes: int, seconds: float) -> None:
    seconds = max(seconds, 1e-9)
    print(f"{docs} documents, {tokens} tokens | {tokens / seconds:,.0f} tokens/s | "
          f"{nbytes / seconds / 2**20:.1f} MB/s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    parser.add_argument("--tokenizer", required=True, help="byte, an HF tokenizer folder/tokenizer.json, or .model")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES,
                        help="longest JSONL line accepted (bytes); a longer one stops the run, never read whole")
    args = parser.parse_args()
    counts = preprocess(args.input, args.output_prefix, args.tokenizer, args.text_key, args.workers,
                        max_line_bytes=args.max_line_bytes)
    print(f"wrote {args.output_prefix}.bin/.idx: {counts['documents']} documents, {counts['tokens']} tokens")


if __name__ == "__main__":  # worker processes re-import this module
    main()
