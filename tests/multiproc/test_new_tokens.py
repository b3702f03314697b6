"""model.new_tokens and model.init_strategy under TP=1, TP=2 and PP=2, and SFT runs with new tokens (LoRA under TP=2,
a frozen embedding under PP=2) whose exports load in transformers and peft: every model is built in one launch."""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
import transformers

from tests.conftest import ROOT, launch_cmd, train_env

WORKER = ROOT / "tests" / "multiproc" / "new_tokens_worker.py"
TOKENS = ["<tool_call>", "</tool_call>"]
TEXTS = ["tool call", "the end"]


def save_tiny_with_tokenizer(folder, tied: bool, seed: int = 0):
    """A tiny Qwen2 whose vocabulary is exactly its (trained here) BPE tokenizer's: new tokens must grow it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [line for line in (ROOT / "megatron_swift" / "assets" / "demo_sft.jsonl").read_text().splitlines()]
    tok.train_from_iterator(corpus + ["tool call", "the end"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
    config = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).float().eval()
    model.save_pretrained(folder)
    return model, tok


def _launch(tmp_path, runs, nproc=2):
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    proc = subprocess.run(launch_cmd(nproc, [str(tmp_path), str(tmp_path / "runs.json")], script=WORKER), cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


LAYOUTS = {"tp1": [], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}
COMMON = ["train.precision=fp32", "train.device=cpu", "logging.tensorboard=false",
          f"model.new_tokens={json.dumps(TOKENS)}"]
CALLS = [{"messages": [{"role": "user", "content": f"add {a} and {b}"},
                       {"role": "assistant", "content": f"<tool_call>add({a},{b})</tool_call>"}]}
         for a in range(8) for b in range(4)]


def _rendered(row) -> str:
    """The tokenizer's chat template (save_tiny_with_tokenizer), by hand."""
    return "".join(f"<|{m['role']}|>{m['content']}<|endoftext|>" for m in row["messages"])


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """(folder, {name: HF model}, vocab, stdout) after one launch building every model of this file."""
    tmp_path = tmp_path_factory.mktemp("new_tokens")
    untied, untied_tok = save_tiny_with_tokenizer(tmp_path / "untied", tied=False)
    tied, _ = save_tiny_with_tokenizer(tmp_path / "tied", tied=True, seed=1)
    (tmp_path / "calls.jsonl").write_text("\n".join(json.dumps(r) for r in CALLS))
    from tokenizers import AddedToken

    untied_tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TOKENS])  # as the run does
    tokens = torch.tensor([untied_tok.encode(_rendered(CALLS[13])).ids])
    torch.save(tokens, tmp_path / "tokens.pt")
    untied_run = ["+model=qwen2", f"model.pretrained={tmp_path / 'untied'}", f"data.tokenizer={tmp_path / 'untied'}"]
    setup_only = [*COMMON, "train.train_iters=0"]
    # A strategy applies to what is not loaded only: here nothing but the new rows, which new_token_init sets.
    runs = [dict(name=f"untied-{k}", overrides=[*untied_run, *setup_only, "model.init_strategy=orthogonal",
                                                 f"train.output_dir={tmp_path / ('run-' + k)}", *v])
            for k, v in LAYOUTS.items()]
    runs.append(dict(name="tied-pp2", overrides=[
        "+model=qwen2", f"model.pretrained={tmp_path / 'tied'}", f"data.tokenizer={tmp_path / 'tied'}", *setup_only,
        "model.new_token_init=text", f"model.new_token_init_text={json.dumps(TEXTS)}",
        f"train.output_dir={tmp_path / 'run-tied'}", "parallel.pp=2"]))
    runs += [dict(name=f"scratch-{k}", overrides=[
        "+model=qwen3", "model.init_strategy=xavier_uniform", *setup_only, f"train.output_dir={tmp_path / ('s-' + k)}",
        *v]) for k, v in list(LAYOUTS.items())[:2]]
    sft = [*untied_run, *COMMON, "data=sft", f"data.path=[{tmp_path / 'calls.jsonl'}]", "train.global_batch_size=8",
           "train.lr=1e-2", "train.weight_decay=0.1", "train.seq_length=64", "train.train_iters=4"]
    runs.append(dict(name="lora-tp2", fit=True, tokens=str(tmp_path / "tokens.pt"), overrides=[
        *sft, "tuner=lora", "tuner.rank=4", "parallel.tp=2", f"train.output_dir={tmp_path / 'lora'}"]))
    prefs = [{"prompt": f"add {a} and 1", "chosen": f"<tool_call>add({a},1)</tool_call>", "rejected": f"{a}"}
             for a in range(8)]
    (tmp_path / "prefs.jsonl").write_text("\n".join(json.dumps(r) for r in prefs))
    runs.append(dict(name="dpo", fit=True, overrides=[
        *untied_run, *COMMON, "data=prefs", f"data.path=[{tmp_path / 'prefs.jsonl'}]", "task=dpo", "train.lr=0",
        "train.min_lr=0", "train.train_iters=1", "train.global_batch_size=8", "train.seq_length=64",
        f"train.output_dir={tmp_path / 'dpo'}"]))
    runs.append(dict(name="freeze-pp2", fit=True, tokens=str(tmp_path / "tokens.pt"), overrides=[
        *sft, "train.freeze=[embedding]", "parallel.pp=2", f"train.output_dir={tmp_path / 'freeze'}"]))
    stdout = _launch(tmp_path, runs)
    return tmp_path, {"untied": untied, "tied": tied}, untied.config.vocab_size, stdout


def _merged(tmp_path, name):
    out = {}
    for f in sorted(tmp_path.glob(f"{name}-pp*.pt")):
        out.update(torch.load(f, weights_only=True))
    return out


def test_new_rows_and_init_strategy_under_every_layout(launched):
    tmp_path, models, vocab, stdout = launched
    untied, tied = models["untied"], models["tied"]
    assert f"initialised, not loaded: embedding rows {vocab}-{vocab + 1} (mean), output rows {vocab}-{vocab + 1} " \
           "(mean)" in stdout

    hf = untied.state_dict()
    old_emb, old_out = hf["model.embed_tokens.weight"], hf["lm_head.weight"]
    for layout in LAYOUTS:
        got = _merged(tmp_path, f"untied-{layout}")
        emb, out = got["model.embed_tokens.weight"], got["lm_head.weight"]
        assert emb.shape == (vocab + 2, 64) and out.shape == (vocab + 2, 64), layout
        assert torch.equal(emb[:vocab], old_emb) and torch.equal(out[:vocab], old_out), layout  # bitwise
        for new, old in ((emb, old_emb), (out, old_out)):  # by hand: the mean of the tokenizer's rows
            mean = old.double().mean(0).float()
            assert torch.allclose(new[vocab:], mean.expand(2, -1), atol=1e-7, rtol=0), layout
        for name, tensor in got.items():  # every other tensor is the checkpoint's
            if name not in ("model.embed_tokens.weight", "lm_head.weight"):
                assert torch.equal(tensor, hf[name]), (layout, name)

    from tokenizers import Tokenizer

    tied_tok = Tokenizer.from_file(str(tmp_path / "tied" / "tokenizer.json"))
    got, hf = _merged(tmp_path, "tied-pp2"), tied.state_dict()
    emb, copy = got["model.embed_tokens.weight"], got["copy:model.embed_tokens.weight"]
    assert torch.equal(emb, copy)  # tied stays tied: the last stage's copy is the embedding
    assert torch.equal(emb[:vocab], hf["model.embed_tokens.weight"])
    for k, text in enumerate(TEXTS):
        ids = tied_tok.encode(text).ids
        assert len(ids) > 1
        expected = hf["model.embed_tokens.weight"][ids].double().mean(0).float()
        assert torch.allclose(emb[vocab + k], expected, atol=1e-7, rtol=0)

    tp1, tp2 = _merged(tmp_path, "scratch-tp1"), _merged(tmp_path, "scratch-tp2")
    assert sorted(tp1) == sorted(tp2)
    for name in tp1:
        assert torch.equal(tp1[name], tp2[name]), name  # the same model whatever the layout
    q = tp1["model.layers.0.self_attn.q_proj.weight"]  # its own HF shape's fans: [out, in] = [q heads x d, 64]
    assert q.std().item() == pytest.approx(math.sqrt(2.0 / (q.shape[0] + q.shape[1])), rel=0.1)


def _new_token_loss(model, tokenizer, vocab) -> float:
    """transformers' mean cross-entropy of the positions whose next token is a new one, over the SFT rows."""
    total, count = 0.0, 0
    rows = CALLS[::4]  # 8 of the training rows
    for row in rows:
        ids = torch.tensor([tokenizer.encode(_rendered(row), add_special_tokens=False)])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        at = (targets >= vocab).nonzero()[:, 0]
        total -= logp[at, targets[at]].sum().item()
        count += len(at)
    assert count == 2 * len(rows)  # each row: both tokens, each one id
    return total / count


def test_lora_trains_only_new_rows_and_its_peft_adapter_gives_the_checkpoint_logits(launched):
    import peft

    from tests.multiproc.test_hf_export import _export

    tmp_path, models, vocab, stdout = launched
    base = models["untied"]
    assert "new token rows train (only they)" in stdout
    original, trained = base.state_dict(), _merged(tmp_path, "lora-tp2")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(trained[name][:vocab], original[name])  # old rows bitwise, with weight decay on
        assert not torch.allclose(trained[name][vocab:], original[name].double().mean(0).float().expand(2, -1))

    adapter = tmp_path / "lora-adapter"
    _export(tmp_path / "lora", adapter, "--export", "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": [vocab, vocab + 1], "lm_head": [vocab, vocab + 1]}
    tokenizer = transformers.AutoTokenizer.from_pretrained(adapter)  # the adapter folder's tokenizer has them
    assert [tokenizer.encode(t, add_special_tokens=False) for t in TOKENS] == [[vocab], [vocab + 1]]
    resized = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
    resized.resize_token_embeddings(len(tokenizer))
    with_adapter = peft.PeftModel.from_pretrained(resized, adapter).eval()
    tokens = torch.load(tmp_path / "tokens.pt", weights_only=True)
    assert vocab in tokens and vocab + 1 in tokens
    megatron = torch.load(tmp_path / "lora-tp2-logits.pt", weights_only=True)[..., :vocab + 2]
    with torch.no_grad():
        assert (with_adapter(tokens).logits - megatron).abs().max().item() < 1e-4

    # The loss on the new tokens falls: the run's start (the mean rows) against the trained model.
    start = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
    start.resize_token_embeddings(vocab + 2)
    with torch.no_grad():
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            start.get_parameter(name)[vocab:] = original[name].double().mean(0).float()
    assert _new_token_loss(with_adapter, tokenizer, vocab) < _new_token_loss(start.eval(), tokenizer, vocab)


def test_frozen_embedding_trains_new_rows_and_export_gives_the_checkpoint_logits(launched):
    from safetensors.torch import load_file

    from tests.multiproc.test_hf_export import _export

    tmp_path, models, vocab, _ = launched
    original, trained = models["untied"].state_dict(), _merged(tmp_path, "freeze-pp2")
    emb = trained["model.embed_tokens.weight"]
    assert torch.equal(emb[:vocab], original["model.embed_tokens.weight"])
    assert not torch.allclose(emb[vocab:], original["model.embed_tokens.weight"].double().mean(0).float())
    assert not torch.equal(trained["lm_head.weight"][:vocab], original["lm_head.weight"])  # not frozen: trains
    out = tmp_path / "freeze-hf"
    _export(tmp_path / "freeze", out)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())  # nothing missing, unexpected or mismatched
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab + 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert [tokenizer.encode(t, add_special_tokens=False) for t in TOKENS] == [[vocab], [vocab + 1]]
    assert all(tokenizer.added_tokens_decoder[vocab + k].special for k in range(2))
    exported = load_file(out / "model.safetensors")
    assert torch.equal(exported["model.embed_tokens.weight"][:vocab], original["model.embed_tokens.weight"])
    tokens = torch.load(tmp_path / "tokens.pt", weights_only=True)
    with torch.no_grad():
        hf_logits = model.eval()(tokens).logits
    megatron = torch.load(tmp_path / "freeze-pp2-logits.pt", weights_only=True)[..., :vocab + 2]
    assert (megatron - hf_logits).abs().max().item() < 1e-4


def test_dpo_reference_starts_with_the_policys_new_rows(launched):
    """lr 0: policy and reference are the same model, so the DPO loss of step 1 is log 2 exactly by hand (a
    reference whose new rows were left zero gave 0.6959 here)."""
    from tests.conftest import read_metrics

    tmp_path = launched[0]
    (row,) = read_metrics(tmp_path / "dpo")
    assert row["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
