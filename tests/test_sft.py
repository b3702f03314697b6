"""SFT rows: exact ids, labels and loss masks against a hand-built rendering; formats; packing; bad rows."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_swift.data.conversations import to_messages
from megatron_swift.data.errors import DataError
from megatron_swift.data.packing import best_fit_decreasing
from megatron_swift.data.sft import SFTRows, encode, sft_source
from megatron_swift.data.templates import load_template
from megatron_swift.data.tokenizer import ByteTokenizer, HFTokenizer

# Written here, independently of the project's built-in copy.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
    """A BPE tokenizer trained on the fly, with ChatML specials, and a tokenizer_config holding the template."""
    from tests.conftest import bpe_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    tok = bpe_tokenizer(["You help people. Hi there, hello again and bye.", "system user assistant says hello"],
                        SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return folder


CONVERSATION = [
    {"role": "system", "content": "You help.", "loss": None},
    {"role": "user", "content": "Hi", "loss": None},
    {"role": "assistant", "content": "Hello there", "loss": None},
    {"role": "user", "content": "Again", "loss": None},
    {"role": "assistant", "content": "Bye", "loss": None},
]

# The rendered conversation as (piece, kind): 'a1'/'a2' are the assistant turns' bodies and end-of-turn tokens.
PIECES = [("<|im_start|>", ""), ("system\nYou help.", ""), ("<|im_end|>", ""), ("\n", ""),
          ("<|im_start|>", ""), ("user\nHi", ""), ("<|im_end|>", ""), ("\n", ""),
          ("<|im_start|>", ""), ("assistant\n", ""), ("Hello there", "a1"), ("<|im_end|>", "a1"), ("\n", ""),
          ("<|im_start|>", ""), ("user\nAgain", ""), ("<|im_end|>", ""), ("\n", ""),
          ("<|im_start|>", ""), ("assistant\n", ""), ("Bye", "a2"), ("<|im_end|>", "a2"), ("\n", "")]


def _by_hand(tok: HFTokenizer, kinds_with_loss):
    ids, targets = [], []
    for piece, kind in PIECES:
        piece_ids = tok.encode(piece)
        ids += piece_ids
        targets += [kinds_with_loss is None or kind in kinds_with_loss] * len(piece_ids)
    return np.array(ids), np.array(targets)


@pytest.mark.parametrize("loss_on,kinds", [("assistant", {"a1", "a2"}), ("last_assistant", {"a2"}), ("all", None)])
def test_ids_and_mask_match_the_hand_built_rendering(tok_folder, loss_on, kinds):
    tok = HFTokenizer(str(tok_folder))
    template = load_template(None, str(tok_folder))
    ids, targets = encode([dict(m) for m in CONVERSATION], template, tok, loss_on)
    expected_ids, expected_targets = _by_hand(tok, kinds)
    assert tok.encode("".join(p for p, _ in PIECES)) == expected_ids.tolist()  # pieces tokenize as the whole
    assert ids.tolist() == expected_ids.tolist()
    assert targets.tolist() == expected_targets.tolist()


def test_message_loss_flag_overrides_the_mode(tok_folder):
    tok = HFTokenizer(str(tok_folder))
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["loss"] = False  # first assistant turn excluded
    messages[1]["loss"] = True  # a user turn included: its whole rendering up to its end-of-turn
    _, targets = encode(messages, load_template(None, str(tok_folder)), tok, "assistant")
    ids, _ = _by_hand(tok, None)
    expected = []
    for piece, kind in PIECES:
        expected += [kind == "a2"] * len(tok.encode(piece))
    # The user turn spans '<|im_start|>user\nHi<|im_end|>' (after the previous turn's trailing newline).
    start = len(tok.encode("<|im_start|>system\nYou help.<|im_end|>\n"))
    user = len(tok.encode("<|im_start|>user\nHi<|im_end|>"))
    expected[start:start + user] = [True] * user
    assert targets.tolist() == expected


def test_row_shapes_become_the_same_messages():
    want = [{"role": "system", "content": "Be brief.", "loss": None}, {"role": "user", "content": "Q", "loss": None},
            {"role": "assistant", "content": "A", "loss": None}]
    sharegpt = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    alpaca = {"system": "Be brief.", "instruction": "Q", "output": "A"}
    messages = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
                             {"role": "assistant", "content": "A"}]}
    for row in (sharegpt, alpaca, messages):
        assert to_messages(row) == want
    alpaca_input = to_messages({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    assert alpaca_input[0]["content"] == "Add.\n\n1 and 2"


def test_best_fit_decreasing_by_hand():
    # Sorted: 6,5,4,3,2,1 into rows of 8: 6 -> r0 (2 free), 5 -> r1 (3), 4 -> r2 (4), 3 -> r1 (0),
    # 2 -> r0 (0), 1 -> r2 (3).
    assert best_fit_decreasing([5, 3, 4, 2, 6, 1], 8) == [[4, 3], [0, 1], [2, 5]]
    with pytest.raises(ValueError):
        best_fit_decreasing([9], 8)


def _cfg(**kw):
    base = dict(format="auto", loss_on="assistant", truncation="error", on_error="error", packing=False,
                template=None, weights=[], streaming=False, stream_buffer=10, pack_window=4)
    base.update(kw)
    return SimpleNamespace(**base)


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _qa(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def test_packed_rows_restart_positions_and_ignore_the_label_at_each_sample_start(tmp_path):
    tok = ByteTokenizer()
    path = _write(tmp_path / "d.jsonl", [_qa("a", "b"), _qa("cc", "dd"), _qa("e", "ffff")])
    rows = sft_source([path], _cfg(packing=True), tok, 96, "plain", None)
    template = load_template("plain", None)
    lengths = [len(encode(to_messages(_qa(q, a)), template, tok, "assistant")[0])
               for q, a in (("a", "b"), ("cc", "dd"), ("e", "ffff"))]
    assert sum(lengths) <= 96 and len(rows) == 1  # all three fit one row
    row = rows[0]
    order = rows.rows[0]
    at = 0
    for seg, sample in enumerate(order):
        n = lengths[sample]
        assert row["positions"][at:at + n].tolist() == list(range(n))
        assert (row["segments"][at:at + n] == seg).all()
        assert row["loss_mask"][at + n - 1] == 0  # would predict the next sample's first token
        assert row["labels"][at:at + n - 1].tolist() == row["tokens"][at + 1:at + n].tolist()
        at += n
    assert (row["segments"][at:] == -1).all() and (row["loss_mask"][at:] == 0).all()
    unpacked = sft_source([path], _cfg(packing=False), tok, 96, "plain", None)
    assert len(unpacked) == 3 and unpacked.collate([unpacked[0]]).segments is None


def test_truncation_modes(tmp_path):
    tok = ByteTokenizer()
    # Row 2's answer starts early (truncating keeps part of it); row 3's starts after 48 tokens.
    path = _write(tmp_path / "d.jsonl", [_qa("short", "ok"), _qa("q", "y" * 80), _qa("x" * 80, "b")])
    with pytest.raises(DataError, match=r"d.jsonl:2: conversation has \d+ tokens, more than train.seq_length=48"):
        sft_source([path], _cfg(), tok, 48, "plain", None)
    truncated = sft_source([path], _cfg(truncation="truncate"), tok, 48, "plain", None)
    # Truncating row 3 leaves it nothing to learn, so it is dropped.
    assert "1 truncated, 1 dropped" in truncated.description and len(truncated) == 2
    assert truncated.samples.ids[1].tolist() == tok.encode_with_offsets(
        load_template("plain", None).render(to_messages(_qa("q", "y" * 80))))[0][:48]
    dropped = sft_source([path], _cfg(truncation="drop"), tok, 48, "plain", None)
    assert "0 truncated, 2 dropped" in dropped.description and len(dropped) == 1


BAD_ROWS = {
    "json": ('{"messages": [', "invalid JSON"),
    "role": ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
             "message 0 has role 'robot'"),
    "empty": (_qa("q", "  "), "an assistant turn is empty"),
    "no_assistant": ({"messages": [{"role": "user", "content": "q"}]}, "conversation has no assistant turn"),
    "shape": ({"text": "x"}, "row has none of 'messages', 'conversations' or 'instruction'"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path, kind):
    bad, message = BAD_ROWS[kind]
    path = _write(tmp_path / "d.jsonl", [_qa("a", "b"), _qa("c", "d"), bad, _qa("e", "f")])
    with pytest.raises(DataError, match=f"d.jsonl:3: {message}"):
        sft_source([path], _cfg(), ByteTokenizer(), 64, "plain", None)
    skipped = sft_source([path], _cfg(on_error="skip"), ByteTokenizer(), 64, "plain", None)
    assert len(skipped) == 3 and "1 bad rows skipped" in skipped.description


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    rewriting = tmp_path / "t.jinja"
    rewriting.write_text("{{ messages | length }} turns\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    path = _write(tmp_path / "d.jsonl", [_qa("a", "b")])
    with pytest.raises(DataError, match="renders the first 1 messages differently"):
        sft_source([path], _cfg(), ByteTokenizer(), 64, str(rewriting), None)


def test_byte_tokenizer_offsets_parse_specials():
    ids, spans = ByteTokenizer().encode_with_offsets("hé<|endoftext|>x")
    assert ids == [104, 0xC3, 0xA9, 256, 120] and spans == [(0, 1), (1, 2), (1, 2), (2, 15), (15, 16)]


def test_rows_report_fill(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_qa("a" * i, "b") for i in range(1, 9)])
    rows = sft_source([path], _cfg(packing=True), ByteTokenizer(), 128, "plain", None)
    assert isinstance(rows, SFTRows) and "% filled" in rows.description and len(rows) < 8


def test_packed_attention_inputs_by_hand():
    import torch

    from megatron_swift.models.attention import block_causal_mask, thd_params

    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = ~block_causal_mask(segments)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    params = thd_params(segments)
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 2, 5, 6]
    assert params.max_seqlen_q == 3 and params.cu_seqlens_q.dtype == torch.int32


def test_weighted_files_are_drawn_in_proportion(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_qa("a", "A")] * 30)
    b = _write(tmp_path / "b.jsonl", [_qa("b", "B")] * 70)
    rows = sft_source([a, b], _cfg(weights=[0.7, 0.3]), ByteTokenizer(), 64, "plain", None)
    assert len(rows) == 100  # as many samples as the files hold together
    from_a = sum(1 for r in range(len(rows)) if b"<|user|>\na" in bytes(t for t in rows[r]["tokens"] if t < 256))
    assert from_a == 70  # file a (30 rows) repeated up to its 70 % share


def _stream(path, rank, dp, packing=True, buffer=7, window=5):
    from megatron_swift.data.streaming import stream_source

    cfg = _cfg(packing=packing, stream_buffer=buffer, pack_window=window, streaming=True, template="plain")
    return stream_source([path], cfg, ByteTokenizer(), 96, None, 0, rank, dp)


def _row_key(row):
    return bytes(t for t in row["tokens"].tolist() if t < 256)


def test_stream_ranks_read_disjoint_lines_that_cover_the_file(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_qa(f"q{i}", f"a{i}") for i in range(40)])
    seen = []
    for rank in range(2):
        rows = _stream(path, rank, 2, packing=False).next_rows(20)  # one epoch: 20 lines per rank
        seen.append({_row_key(r).split(b"\n<|assistant|>")[0] for r in rows})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {f"<|user|>\nq{i}".encode() for i in range(40)}


def test_stream_state_restores_the_exact_continuation(tmp_path):
    path = _write(tmp_path / "d.jsonl", [_qa(f"q{i}" * (i % 5 + 1), f"a{i}") for i in range(60)])
    a = _stream(path, 1, 2)
    a.next_rows(5)
    while not a.state()["pending"]:  # stop mid-epoch with lines buffered and packed rows pending
        a.next_rows(1)
    state = a.state()
    assert state["buffer"] and state["reader"]["seen"] < 60
    b = _stream(path, 1, 2)
    b.restore(json.loads(json.dumps(state)))  # survives a round trip through plain types
    for x, y in zip(a.next_rows(30), b.next_rows(30)):  # runs into the next epoch
        assert _row_key(x) == _row_key(y) and (x["loss_mask"] == y["loss_mask"]).all()


def test_sentencepiece_sft_masks_the_assistant_text(tmp_path):
    import sentencepiece as spm

    from megatron_swift.data.tokenizer import SentencePieceTokenizer

    corpus = tmp_path / "corpus.txt"
    words = "You help people Hi there hello again and bye system user assistant Hello Bye the quick brown fox"
    corpus.write_text("\n".join(" ".join(words.split()[i:] + words.split()[:i]) for i in range(16)) * 20)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=48,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    tok = SentencePieceTokenizer(str(tmp_path / "sp.model"))
    ids, targets = encode([dict(m) for m in CONVERSATION], load_template("chatml", None), tok, "assistant")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    # Ground truth: SentencePiece itself on each text run between special pieces.
    merged, text = [], ""
    for piece, _ in PIECES + [("<|im_start|>", "")]:
        if piece.startswith("<|"):
            if text:
                merged += sp.encode(text)
                text = ""
            merged.append(sp.piece_to_id(piece))
        else:
            text += piece
    assert ids.tolist() == merged[:-1]
    learned = sp.decode([i for i, t in zip(ids.tolist(), targets) if t and i != sp.piece_to_id("<|im_end|>")])
    assert learned.replace(" ", "") == "HellothereBye"
    assert sum(1 for i, t in zip(ids.tolist(), targets) if t and i == sp.piece_to_id("<|im_end|>")) == 2


@pytest.mark.parametrize("streaming", [False, True])
def test_a_byte_order_mark_before_the_first_row_is_not_part_of_it(tmp_path, streaming):
    """Windows editors start UTF-8 files with a BOM: the first row is a good row, not invalid JSON (nor, with
    data.on_error=skip, a row silently dropped)."""
    from megatron_swift.data.sft import sft_source

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(_qa(f"q{i}", f"a{i}")) + "\n" for i in range(4)).encode())
    if streaming:
        rows = _stream(str(path), 0, 1, packing=False).next_rows(4)
    else:
        rows = [r for r in sft_source([str(path)], _cfg(template="plain"), ByteTokenizer(), 96, "plain", None)]
    assert sorted(_row_key(r).split(b"\n<|assistant|>")[0] for r in rows) == [f"<|user|>\nq{i}".encode()
                                                                              for i in range(4)]
