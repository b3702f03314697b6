"""Loss masks with real chat templates: ids equal transformers' ``apply_chat_template`` and the masked tokens are
exactly each assistant reply as the template renders it inside the whole conversation.

The templates are the stock Qwen3, Qwen3-Thinking-2507, Qwen2.5 and DeepSeek-R1-Distill ones
(tests/fixtures/templates/README.md says where each comes from) and the built-in chatml/llama3. Qwen3 and
DeepSeek-R1 render an assistant turn differently when it is the last one (Qwen3 adds a think block, R1's
generation prompt opens one), so prefix renderings alone give wrong masks for them. The expected replies below
are written by hand from reading each template; their positions and tokens come from transformers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_swift.data.sft import encode
from megatron_swift.data.templates import BUILTIN, TemplateError, load_template
from megatron_swift.data.tokenizer import HFTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
QWEN_END, R1_END, LLAMA_END = "<|im_end|>", "<｜end▁of▁sentence｜>", "<|eot_id|>"
R1_BOS = "<｜begin▁of▁sentence｜>"
# Every marker the templates print, as special tokens of the test tokenizer; none may ever carry loss except
# the end-of-turn tokens and the think tags inside a reply.
HEADERS = ["<|im_start|>", "<｜User｜>", "<｜Assistant｜>", R1_BOS, "<|begin_of_text|>", "<|start_header_id|>",
           "<|end_header_id|>"]
SPECIALS = ["<|endoftext|>", QWEN_END, R1_END, LLAMA_END, "<think>", "</think>", *HEADERS]

ROLES = ("system", "user", "assistant")
SYSTEM, USERS = "You help people.", ["Hi there", "Again please", "One more"]
ANSWERS = ["Hello there.", "Sure, again.", "Bye for now."]
THOUGHTS = ["The user greets.", None, "The user leaves."]  # reasoning of replies 1 and 3 (reasoning case)


def conversation(reasoning: bool):
    """system + 3 user/assistant turns; with ``reasoning`` replies 1 and 3 start with a <think> block."""
    messages = [{"role": "system", "content": SYSTEM}]
    for user, answer, thought in zip(USERS, ANSWERS, THOUGHTS):
        reply = f"<think>\n{thought}\n</think>\n\n{answer}" if reasoning and thought else answer
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def _raw(k: int, reasoning: bool) -> str:
    """Reply ``k``'s content as written in the conversation."""
    return conversation(reasoning)[2 + 2 * k]["content"]


# What each template renders for replies 1-3 after its assistant header (and, for the last reply, after the
# generation prompt), read off the template source. Qwen3 strips reasoning from earlier turns and gives the last
# turn a think block (empty without reasoning); Thinking-2507's generation prompt already opens it; R1 drops
# everything up to </think> in every turn; Qwen2.5, chatml and llama3 print the content as is.
EXPECTED = {
    ("qwen3", False): [f"{ANSWERS[0]}{QWEN_END}", f"{ANSWERS[1]}{QWEN_END}",
                       f"<think>\n\n</think>\n\n{ANSWERS[2]}{QWEN_END}"],
    ("qwen3", True): [f"{ANSWERS[0]}{QWEN_END}", f"{ANSWERS[1]}{QWEN_END}",
                      f"<think>\n{THOUGHTS[2]}\n</think>\n\n{ANSWERS[2]}{QWEN_END}"],
    ("qwen3_thinking_2507", False): [f"{ANSWERS[0]}{QWEN_END}", f"{ANSWERS[1]}{QWEN_END}",
                                     f"\n</think>\n\n{ANSWERS[2]}{QWEN_END}"],
    ("qwen3_thinking_2507", True): [f"{ANSWERS[0]}{QWEN_END}", f"{ANSWERS[1]}{QWEN_END}",
                                    f"{THOUGHTS[2]}\n</think>\n\n{ANSWERS[2]}{QWEN_END}"],
    ("deepseek_r1", False): [f"{a}{R1_END}" for a in ANSWERS],
    ("deepseek_r1", True): [f"\n\n{ANSWERS[0]}{R1_END}", f"{ANSWERS[1]}{R1_END}", f"\n\n{ANSWERS[2]}{R1_END}"],
    **{(name, reasoning): [f"{_raw(k, reasoning)}{QWEN_END}" for k in range(3)]
       for name in ("qwen2_5", "chatml") for reasoning in (False, True)},
    **{("llama3", reasoning): [f"{_raw(k, reasoning)}{LLAMA_END}" for k in range(3)] for reasoning in (False, True)},
}
CONFIG = {"deepseek_r1": {"bos_token": R1_BOS, "eos_token": R1_END},
          "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": LLAMA_END}}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    """A byte-level BPE trained on the fly with every template marker as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [SYSTEM, *USERS, *ANSWERS, *(t for t in THOUGHTS if t), "system user assistant"] * 30
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path


def _folder(tokenizer_json: Path, tmp_path: Path, name: str) -> str:
    """An HF tokenizer folder whose tokenizer_config.json holds the template ``name``."""
    source = BUILTIN[name] if name in BUILTIN else (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    shutil.copy(tokenizer_json, tmp_path / "tokenizer.json")
    config = {"chat_template": source, "eos_token": QWEN_END, "bos_token": None, **CONFIG.get(name, {})}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(tmp_path)


def _truth(folder: str, messages):
    """transformers' rendering, ids and per-token character offsets of the conversation."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(folder)
    text = hf.apply_chat_template(messages, tokenize=False)
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    offsets = hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return hf, text, list(ids), np.asarray(offsets).reshape(-1, 2)


def _reply_ranges(text: str, replies):
    """Character ranges of the expected replies, found in order in the rendered text."""
    ranges, at = [], 0
    for reply in replies:
        start = text.index(reply, at)
        ranges.append((start, start + len(reply)))
        at = start + len(reply)
    return ranges


def _expected_mask(offsets: np.ndarray, ranges) -> np.ndarray:
    """Tokens lying inside a reply range; a token straddling a range boundary fails the test."""
    mask = np.zeros(len(offsets), dtype=bool)
    for start, end in ranges:
        inside = (offsets[:, 0] >= start) & (offsets[:, 1] <= end)
        straddles = (offsets[:, 0] < end) & (offsets[:, 1] > start) & ~inside
        assert not straddles.any(), "a token straddles a reply boundary; the test tokenizer is unsuitable"
        mask |= inside
    return mask


def _forbidden(text: str):
    """Character ranges that must never carry loss: every header marker and every system/user content."""
    spans = []
    headers = [f"<|im_start|>{r}\n" for r in ROLES] + [f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ROLES]
    for needle in [*HEADERS, *headers, SYSTEM, *USERS]:
        at = text.find(needle)
        while at >= 0:
            spans.append((at, at + len(needle)))
            at = text.find(needle, at + 1)
    return spans


TEMPLATES = ["qwen3", "qwen3_thinking_2507", "qwen2_5", "deepseek_r1", "chatml", "llama3"]


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant"])
@pytest.mark.parametrize("reasoning", [False, True], ids=["plain", "reasoning"])
@pytest.mark.parametrize("name", TEMPLATES)
def test_ids_and_masks_match_transformers(tokenizer_json, tmp_path, name, reasoning, loss_on):
    folder = _folder(tokenizer_json, tmp_path, name)
    messages = conversation(reasoning)
    hf, text, hf_ids, offsets = _truth(folder, messages)
    replies = EXPECTED[(name, reasoning)]
    ranges = _reply_ranges(text, replies)
    if loss_on == "last_assistant":
        ranges = ranges[-1:]
    expected = _expected_mask(offsets, ranges)

    ids, targets = encode([{**m, "loss": None} for m in messages], load_template(None, folder),
                          HFTokenizer(folder), loss_on)

    assert ids.tolist() == hf_ids
    # Decoded runs of masked tokens are the replies, so a wrong mask shows what it covers.
    runs = np.split(np.arange(len(ids)), np.flatnonzero(np.diff(targets.astype(int))) + 1)
    masked = [hf.decode(ids[run].tolist(), skip_special_tokens=False) for run in runs if targets[run[0]]]
    assert masked == [text[s:e] for s, e in ranges]
    assert targets.tolist() == expected.tolist()
    for start, end in _forbidden(text):
        covers = (offsets[:, 0] < end) & (offsets[:, 1] > start)
        assert not (targets & covers).any(), f"a masked token lies in {text[start:end]!r}"


def test_earlier_reasoning_is_not_rendered_by_qwen3(tokenizer_json, tmp_path):
    """The case of the bug report: reply 1's reasoning is stripped in the whole conversation but its prefix
    rendering (as the last turn) carries a think block, so a prefix-length span ran into the next user turn."""
    folder = _folder(tokenizer_json, tmp_path, "qwen3")
    messages = [{**m, "loss": None} for m in conversation(True)]
    text, spans = load_template(None, folder).spans(messages)
    assert THOUGHTS[0] not in text
    assert text[spans[2].start:spans[2].end] == f"{ANSWERS[0]}{QWEN_END}"
    assert text[spans[3].start:spans[3].end] == f"<|im_start|>user\n{USERS[1]}{QWEN_END}"


# Templates under which a reply cannot be located exactly once a later turn follows: its content is printed
# twice (which copy is the reply?), not at all, or closed by another end-of-turn text than as the last turn.
ECHO = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' and not loop.last %} (repeat: {{ m['content'] }}){% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DROP = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


CLOSE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
         "{% if loop.last %}<|im_end|>{% else %}<|endoftext|>{% endif %}\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("source,first,reason", [
    (ECHO, "message 2 (assistant)", "prints its content more than once"),
    (DROP, "message 2 (assistant)", "does not print its content"),
    (CLOSE, "message 0 (system)", "end-of-turn text as the last message ('<|im_end|>') is not what follows"),
], ids=["twice", "dropped", "other_end"])
def test_template_without_exact_spans_is_refused(tokenizer_json, tmp_path, source, first, reason):
    path = tmp_path / "odd.jinja"
    path.write_text(source, encoding="utf-8")
    folder = _folder(tokenizer_json, tmp_path, "chatml")
    messages = [{**m, "loss": None} for m in conversation(False)]
    with pytest.raises(TemplateError) as refused:
        encode(messages, load_template(str(path), folder), HFTokenizer(folder), "assistant")
    message = str(refused.value)
    assert str(path) in message and f"{first}: " in message and reason in message
    assert "data.template=" in message
