"""Indexed pretraining data: preprocess round trip, megatron-core's GPT windows, blend ratios."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from megatron_swift.data.errors import DataError
from megatron_swift.data.pretrain import indexed_source
from megatron_swift.data.tokenizer import ByteTokenizer
from tests.conftest import ROOT

PREPROCESS = ROOT / "tools" / "preprocess_data.py"
sys.path.insert(0, str(ROOT / "tools"))
from preprocess_data import preprocess  # noqa: E402


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _preprocess(inputs, prefix, *extra):
    return subprocess.run([sys.executable, str(PREPROCESS), "--input", *map(str, inputs), "--output-prefix",
                           str(prefix), "--tokenizer", "byte", "--workers", "2", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_preprocess_round_trip_equals_direct_tokenization(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    texts = [f"document {i}: " + "héllo wörld " * (i % 7 + 1) for i in range(200)]
    proc = _preprocess([_jsonl(tmp_path / "a.jsonl", texts[:120]), _jsonl(tmp_path / "b.jsonl", texts[120:])],
                       tmp_path / "corpus")
    assert proc.returncode == 0, proc.stderr
    assert "200 documents" in proc.stderr and "tokens/s" in proc.stderr
    stored = IndexedDataset(str(tmp_path / "corpus"))
    tok = ByteTokenizer()
    assert len(stored) == len(texts)
    for i, text in enumerate(texts):
        assert stored[i].tolist() == tok.encode(text) + [tok.eod]


def test_preprocess_bad_row_names_file_and_line_and_leaves_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(SystemExit, match=f"{bad}:2: row has no string field 'text'"):
        preprocess([str(bad)], str(tmp_path / "corpus"), "byte", workers=1)
    assert not list(tmp_path.glob("corpus*"))


def _corpus(tmp_path, name, texts):
    preprocess([str(_jsonl(tmp_path / f"{name}.jsonl", texts))], str(tmp_path / name), "byte", workers=1)
    return str(tmp_path / name)


def test_gpt_windows_cover_one_epoch_of_the_token_stream(tmp_path):
    texts = [("abc " * (i + 1)).strip() for i in range(30)]
    prefix = _corpus(tmp_path, "c", texts)
    tok = ByteTokenizer()
    total = sum(len(tok.encode(t)) + 1 for t in texts)
    ds = indexed_source([prefix], None, tok, 16, seed=0, num_samples=None, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == (total - 1) // 16  # one epoch, windows of 16 inputs + 1 shifted label
    batch = ds.collate([ds[0], ds[1]])
    assert batch.tokens.shape == (2, 16)
    assert (batch.labels[:, :-1] == batch.tokens[:, 1:]).all()
    stream = [t for text in texts for t in tok.encode(text) + [tok.eod]]
    counts = np.bincount(np.concatenate([ds[i]["tokens"].numpy() for i in range(len(ds))]), minlength=259)
    assert counts.sum() == len(ds) * 16 and counts[tok.eod] <= stream.count(tok.eod)


@pytest.fixture
def one_rank(tmp_path):
    """megatron-core's BlendedDataset asks for the rank when it caches; training always has a process group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_blend_follows_the_weights_within_2_percent(tmp_path, one_rank):
    a = _corpus(tmp_path, "a", ["alpha " * 20] * 40)
    b = _corpus(tmp_path, "b", ["beta " * 20] * 40)
    ds = indexed_source([a, b], [0.7, 0.3], ByteTokenizer(), 32, seed=1, num_samples=10_000,
                        cache_dir=str(tmp_path / "cache"))
    assert len(ds) >= 10_000
    share = float(np.mean(ds.dataset.dataset_index[:10_000] == 0))
    assert abs(share - 0.7) < 0.02, share
    first = ds[int(np.argmax(ds.dataset.dataset_index == 1))]["tokens"]
    assert bytes(first.tolist()).decode(errors="ignore").strip().startswith(("beta", "eta", "ta", "a"))


def test_missing_prefix_is_named(tmp_path):
    with pytest.raises(DataError, match="nope.bin: indexed dataset file not found"):
        indexed_source([str(tmp_path / "nope")], None, ByteTokenizer(), 16, 0, None, str(tmp_path))
