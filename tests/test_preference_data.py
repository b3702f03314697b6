"""Preference rows: both shapes become the same pair; bad rows name file and line or are skipped."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from megatron_swift.data.errors import DataError
from megatron_swift.data.preference import preference_source, to_pair
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
