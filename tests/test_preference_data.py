"""Preference rows: both shapes become the same pair; bad rows name file and line or are skipped."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from megatron_swift.data.errors import DataError
from megatron_swift.data.preference import kto_source, preference_source, to_example, to_pair
from megatron_swift.data.tokenizer import ByteTokenizer


def _cfg(**kw):
    base = dict(template="plain", on_error="error", truncation="error")
    base.update(kw)
    return SimpleNamespace(**base)


def test_row_shapes_give_the_same_pair():
    a = to_pair({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
                 "rejected_response": "bad"})
    b = to_pair({"prompt": "Q", "chosen": "good", "rejected": "bad"})
    c = to_pair({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
                 "rejected": [{"role": "assistant", "content": "bad"}]})
    assert a == b == c == ([{"role": "user", "content": "Q", "loss": None}], "good", "bad")


def test_pairs_keep_chosen_and_rejected_together_and_mask_only_the_completion(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "chosen": "yes", "rejected": "no"}) + "\n")
    pairs = preference_source([str(path)], _cfg(), ByteTokenizer(), 64, None)
    batch = pairs.collate([pairs[0]])
    assert batch.tokens.shape == (2, 64)
    for row, answer in ((0, b"yes"), (1, b"no")):
        learned = bytes(int(t) for t, m in zip(batch.labels[row], batch.loss_mask[row]) if m and t < 256)
        assert learned == answer  # the completion; its end-of-turn token (eod) carries loss too
        assert int(batch.loss_mask[row].sum()) == len(answer) + 1


BAD = {
    "missing": ({"prompt": "Q", "chosen": "a"}, "missing rejected"),
    "identical": ({"prompt": "Q", "chosen": "a", "rejected": "a"}, "chosen and rejected completions are identical"),
    "empty": ({"prompt": "Q", "chosen": " ", "rejected": "a"}, "the chosen completion is empty"),
    "no_rejected_response": ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "a"}]},
                             "no 'rejected_response'"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_pairs_name_file_and_line_or_are_skipped(tmp_path, kind):
    row, message = BAD[kind]
    path = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"})
    path.write_text("\n".join([good, json.dumps(row), good]) + "\n")
    with pytest.raises(DataError, match=f"p.jsonl:2: .*{message}"):
        preference_source([str(path)], _cfg(), ByteTokenizer(), 64, None)
    pairs = preference_source([str(path)], _cfg(on_error="skip"), ByteTokenizer(), 64, None)
    assert len(pairs) == 2 and "1 bad rows skipped" in pairs.description


def test_margin_is_read_per_pair_and_checked(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "Q", "chosen": "a", "rejected": "b", "margin": 1.5}, {"prompt": "Q", "chosen": "a",
                                                                             "rejected": "c"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = preference_source([str(path)], _cfg(), ByteTokenizer(), 64, None)
    assert pairs.collate([pairs[0], pairs[1]]).margin.tolist() == [1.5, 0.0]
    path.write_text(json.dumps(dict(rows[0], margin="big")) + "\n")
    with pytest.raises(DataError, match="p.jsonl:1: 'margin' must be a number"):
        preference_source([str(path)], _cfg(), ByteTokenizer(), 64, None)


def test_kto_row_shapes_give_the_same_example():
    a = to_example({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                    "label": True})
    b = to_example({"prompt": "Q", "completion": "A", "label": True})
    c = to_example({"prompt": [{"role": "user", "content": "Q"}],
                    "completion": [{"role": "assistant", "content": "A"}], "label": True})
    assert a == b == c == ([{"role": "user", "content": "Q", "loss": None}], "A", True)


def test_kto_rows_pair_each_example_with_the_next_completion_for_the_kl_row(tmp_path):
    path = tmp_path / "k.jsonl"
    rows = [{"prompt": "P0", "completion": "c0", "label": True}, {"prompt": "P1", "completion": "c1", "label": False},
            {"prompt": "P2", "completion": "c2", "label": True}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = kto_source([str(path)], _cfg(), ByteTokenizer(), 64, None)
    batch = data.collate([data[i] for i in range(3)])
    assert batch.tokens.shape == (6, 64) and batch.desirable.tolist() == [True, False, True]
    text = [bytes(int(t) for t in batch.tokens[r, : batch.lengths[r]] if t < 256).decode() for r in range(6)]
    for i in range(3):
        assert f"P{i}" in text[i] and f"c{i}" in text[i]
        assert f"P{i}" in text[3 + i] and f"c{(i + 1) % 3}" in text[3 + i]  # the KL row
    assert "2 desirable / 1 undesirable" in data.description


KTO_BAD = {
    "no_label": ({"prompt": "Q", "completion": "a"}, "no 'label'"),
    "string_label": ({"prompt": "Q", "completion": "a", "label": "yes"}, "'label' must be true or false"),
    "empty": ({"prompt": "Q", "completion": "", "label": True}, "the labelled completion is empty"),
    "shape": ({"prompt": "Q", "label": False}, "needs 'prompt' and 'completion'"),
}


@pytest.mark.parametrize("kind", list(KTO_BAD))
def test_bad_kto_rows_name_file_and_line_or_are_skipped(tmp_path, kind):
    row, message = KTO_BAD[kind]
    path = tmp_path / "k.jsonl"
    good = [json.dumps({"prompt": "Q", "completion": c, "label": True}) for c in ("a", "b")]
    path.write_text("\n".join([good[0], json.dumps(row), good[1]]) + "\n")
    with pytest.raises(DataError, match=f"k.jsonl:2: .*{message}"):
        kto_source([str(path)], _cfg(), ByteTokenizer(), 64, None)
    data = kto_source([str(path)], _cfg(on_error="skip"), ByteTokenizer(), 64, None)
    assert len(data) == 2 and "1 bad rows skipped" in data.description


def test_kto_needs_two_examples(tmp_path):
    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "completion": "a", "label": True}) + "\n")
    with pytest.raises(DataError, match="at least 2 usable examples"):
        kto_source([str(path)], _cfg(), ByteTokenizer(), 64, None)
