"""model.new_tokens in each tokenizer kind, model.init_strategy's distributions, and their bad input (in-process)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_swift.config.compose import compose
from megatron_swift.config.validate import ConfigError, validate
from megatron_swift.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer
from megatron_swift.models.init_strategy import STRATEGIES, generate
from megatron_swift.models.new_tokens import add_to_tokenizer

TOKENS = ["<tool_call>", "</tool_call>"]
TEXT = "Sure.<tool_call>{\"name\": \"add\"}</tool_call> done"


def _cfg(tokens, init="mean", texts=()):
    return SimpleNamespace(new_tokens=list(tokens), new_token_init=init, new_token_init_text=list(texts))


def _hf_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["tool call and a call of tools", "the end of the text"] * 20,
                            trainers.BpeTrainer(vocab_size=120, special_tokens=["<|endoftext|>"]))
    tok.save(str(folder / "tokenizer.json"))
    return HFTokenizer(str(folder))


def _sp_tokenizer(folder):
    import sentencepiece as spm

    text = folder / "text.txt"
    text.write_text("\n".join(["tool call and a call of tools", "the end of the text", "sure done name add"] * 30))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "sp"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    return SentencePieceTokenizer(str(folder / "sp.model"))


@pytest.mark.parametrize("kind", ["byte", "hf", "sentencepiece"])
def test_new_tokens_are_single_ids_and_decode_back(tmp_path, kind):
    tokenizer = {"byte": lambda: ByteTokenizer(), "hf": lambda: _hf_tokenizer(tmp_path),
                 "sentencepiece": lambda: _sp_tokenizer(tmp_path)}[kind]()
    before = tokenizer.vocab_size
    assert len(tokenizer.encode_with_offsets("<tool_call>")[0]) > 1  # split before it is added
    lines = []
    new = add_to_tokenizer(tokenizer, _cfg(TOKENS, "text", ["tool call", "the end"]), lines.append)
    assert new.ids == [before, before + 1] and new.added == [True, True] and new.rows == new.ids
    assert tokenizer.vocab_size == before + 2 and new.known == before
    assert all(len(ids) > 1 for ids in new.text_ids)  # encoded with the tokenizer's own tokens
    for encode in (lambda t: tokenizer.encode_with_offsets(t)[0], tokenizer.encode):
        ids = encode(TEXT)
        assert ids.count(before) == 1 and ids.count(before + 1) == 1
    ids, spans = tokenizer.encode_with_offsets(TEXT)
    assert TEXT[slice(*spans[ids.index(before)])] == "<tool_call>"
    if kind != "hf":  # the tokenizers library drops special tokens when decoding, as transformers does by default
        assert tokenizer.decode(tokenizer.encode(TEXT)).replace(" ", "") == TEXT.replace(" ", "")
    # Added again (a resume): the same ids, nothing grows; a token the tokenizer has is reused with a line.
    again = add_to_tokenizer(tokenizer, _cfg(TOKENS + ["a"]), lines.append)
    assert again.ids[:2] == new.ids and again.added == [False, False, False] and tokenizer.vocab_size == before + 2
    assert any("'a' is already token" in line for line in lines)


# Expected standard deviation of each strategy on a [out=96, in=160] matrix, by hand.
FAN_IN, FAN_OUT, STD = 160, 96, 0.02
EXPECTED_STD = {
    "normal": STD, "uniform": STD, "zero": 0.0,
    "xavier_uniform": math.sqrt(2.0 / (FAN_IN + FAN_OUT)), "xavier_normal": math.sqrt(2.0 / (FAN_IN + FAN_OUT)),
    "kaiming_uniform": math.sqrt(2.0 / FAN_IN), "kaiming_normal": math.sqrt(2.0 / FAN_IN),
    "orthogonal": math.sqrt(1.0 / FAN_IN),  # orthonormal rows of length 1 over FAN_IN entries
}
TORCH_INIT = {
    "normal": lambda t: torch.nn.init.normal_(t, 0, STD),
    "uniform": lambda t: torch.nn.init.uniform_(t, -STD * math.sqrt(3), STD * math.sqrt(3)),
    "zero": torch.nn.init.zeros_, "xavier_uniform": torch.nn.init.xavier_uniform_,
    "xavier_normal": torch.nn.init.xavier_normal_, "kaiming_uniform": torch.nn.init.kaiming_uniform_,
    "kaiming_normal": torch.nn.init.kaiming_normal_, "orthogonal": torch.nn.init.orthogonal_,
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_moments_match_torch_nn_init(strategy):
    torch.manual_seed(3)
    ours = generate(strategy, (FAN_OUT, FAN_IN), "model.layers.0.mlp.down_proj.weight", seed=1, std=STD)
    reference = TORCH_INIT[strategy](torch.empty(FAN_OUT, FAN_IN))
    assert torch.equal(ours, generate(strategy, (FAN_OUT, FAN_IN), "model.layers.0.mlp.down_proj.weight", 1, STD))
    for tensor in (ours, reference):
        assert abs(tensor.mean().item()) < 0.05 * EXPECTED_STD[strategy] + 1e-12
        assert tensor.std().item() == pytest.approx(EXPECTED_STD[strategy], rel=0.05, abs=1e-12)
    # Shape of the distribution: the 4th standardised moment (3 for normal, 1.8 for uniform).
    if strategy != "zero":
        kurt = lambda t: (((t - t.mean()) / t.std()) ** 4).mean().item()  # noqa: E731
        assert kurt(ours) == pytest.approx(kurt(reference), rel=0.1)
    if strategy == "orthogonal":
        assert torch.allclose(ours @ ours.T, torch.eye(FAN_OUT), atol=1e-5)
    other = generate(strategy, (FAN_OUT, FAN_IN), "model.layers.1.mlp.down_proj.weight", seed=1, std=STD)
    assert strategy == "zero" or not torch.equal(ours, other)  # each tensor its own draw


@pytest.mark.parametrize("overrides,message", [
    (["model.new_tokens=['<a>','']"], "model.new_tokens[1] is empty"),
    (["model.init_strategy=he_normal"], "model.init_strategy=he_normal is not one of"),
    (["model.new_tokens=['<a>']", "model.new_token_init=glorot"], "model.new_token_init=glorot is not one of"),
    (["model.new_token_init_text=['tool call']"], "model.new_token_init_text applies to the rows of model.new_tokens"),
    (["model.new_tokens=['<a>','<b>']", "model.new_token_init=text", "model.new_token_init_text=['x']"],
     "model.new_token_init=text needs model.new_token_init_text with one non-empty text per new token"),
    (["model.new_tokens=['<a>','<a>']"], "model.new_tokens lists '<a>' more than once"),
])
def test_bad_new_token_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose(["+model=qwen3", *overrides]), 1)
    assert any(message in line for line in e.value.problems), e.value.problems


def test_sft_rows_hold_new_tokens_as_single_ids_with_loss_in_assistant_turns_only(tmp_path):
    """The chat template renders them as text; the SFT encoding and masks treat them like any token."""
    import json

    from megatron_swift.data.conversations import to_messages
    from megatron_swift.data.sft import encode
    from megatron_swift.data.templates import load_template

    tokenizer = _hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>{% endfor %}")}))
    new = add_to_tokenizer(tokenizer, _cfg(TOKENS), print)
    row = {"messages": [{"role": "user", "content": "call <tool_call> for me"},
                        {"role": "assistant", "content": "<tool_call>add</tool_call>"}]}
    ids, targets = encode(to_messages(row), load_template(None, str(tmp_path)), tokenizer, "assistant")
    ids = ids.tolist()
    opening = [k for k, i in enumerate(ids) if i == new.ids[0]]
    closing = [k for k, i in enumerate(ids) if i == new.ids[1]]
    assert len(opening) == 2 and len(closing) == 1  # one id each time the text appears
    assert not targets[opening[0]] and targets[opening[1]] and targets[closing[0]]  # user turn: no loss
