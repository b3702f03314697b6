"""model.new_tokens and model.init_strategy under TP=1, TP=2 and PP=2 (one launch), and a LoRA SFT run with new
tokens whose exports load in transformers and peft."""
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
                          env=train_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def _merged(tmp_path, name):
    out = {}
    for f in sorted(tmp_path.glob(f"{name}-pp*.pt")):
        out.update(torch.load(f, weights_only=True))
    return out


def test_new_rows_and_init_strategy_under_every_layout(tmp_path):
    untied, untied_tok = save_tiny_with_tokenizer(tmp_path / "untied", tied=False)
    tied, tied_tok = save_tiny_with_tokenizer(tmp_path / "tied", tied=True, seed=1)
    common = ["train.precision=fp32", "train.device=cpu", "train.train_iters=0", "logging.tensorboard=false",
              f"model.new_tokens={json.dumps(TOKENS)}"]
    layouts = {"tp1": [], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}
    runs = [dict(name=f"untied-{k}", overrides=["+model=qwen2", f"model.pretrained={tmp_path / 'untied'}", *common,
                                                 f"data.tokenizer={tmp_path / 'untied'}",
                                                 f"train.output_dir={tmp_path / ('run-' + k)}", *v])
            for k, v in layouts.items()]
    runs.append(dict(name="tied-pp2", overrides=[
        "+model=qwen2", f"model.pretrained={tmp_path / 'tied'}", *common, "model.new_token_init=text",
        f"data.tokenizer={tmp_path / 'tied'}",
        f"model.new_token_init_text={json.dumps(TEXTS)}", f"train.output_dir={tmp_path / 'run-tied'}",
        "parallel.pp=2"]))
    runs += [dict(name=f"scratch-{k}", overrides=[
        "+model=qwen3", "model.init_strategy=xavier_uniform", *common, f"train.output_dir={tmp_path / ('s-' + k)}",
        *v]) for k, v in list(layouts.items())[:2]]
    stdout = _launch(tmp_path, runs)
    (tmp_path / "stdout.txt").write_text(stdout)
    vocab = untied.config.vocab_size
    assert f"initialised, not loaded: embedding rows {vocab}-{vocab + 1} (mean), output rows {vocab}-{vocab + 1} " \
           "(mean)" in stdout

    hf = untied.state_dict()
    old_emb, old_out = hf["model.embed_tokens.weight"], hf["lm_head.weight"]
    for layout in layouts:
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


def test_lora_sft_trains_only_new_rows_and_exports_load(tmp_path):
    import peft
    from safetensors.torch import load_file

    from tests.conftest import run_train
    from tests.multiproc.test_hf_export import _export

    base, _ = save_tiny_with_tokenizer(tmp_path / "base", tied=False)
    vocab = base.config.vocab_size
    rows = [{"messages": [{"role": "user", "content": f"add {a} and {b}"},
                          {"role": "assistant", "content": f"<tool_call>add({a},{b})</tool_call>"}]}
            for a in range(8) for b in range(4)]
    (tmp_path / "calls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    proc = run_train(1, ["+model=qwen2", f"model.pretrained={tmp_path / 'base'}", "data=sft",
                         f"data.path=[{tmp_path / 'calls.jsonl'}]", f"data.tokenizer={tmp_path / 'base'}",
                         f"model.new_tokens={json.dumps(TOKENS)}", "tuner=lora", "tuner.rank=4",
                         "train.precision=fp32", "train.train_iters=4", "train.global_batch_size=8", "train.lr=1e-2",
                         "train.weight_decay=0.1", "train.seq_length=64", "train.save_hf=true",
                         f"train.output_dir={run}", "logging.tensorboard=false"])
    assert "new token rows train (only they)" in proc.stdout
    merged = next((run / "hf").iterdir())
    model, info = transformers.AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    assert [tokenizer.encode(t, add_special_tokens=False) for t in TOKENS] == [[vocab], [vocab + 1]]
    exported = load_file(merged / "model.safetensors")
    original = base.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(exported[name][:vocab], original[name])  # old rows bitwise, weight decay on
        start = original[name].double().mean(0).float()
        assert not torch.allclose(exported[name][vocab:], start.expand(2, -1))  # the new rows trained

    adapter = tmp_path / "adapter"
    _export(run, adapter, "--export", "adapter")
    resized = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    resized.resize_token_embeddings(vocab + 2)
    with_adapter = peft.PeftModel.from_pretrained(resized, adapter).eval()
    tokens = torch.tensor([tokenizer.encode("<|user|>add 3 and 1<|endoftext|><|assistant|><tool_call>add(3,1)"
                                            "</tool_call>", add_special_tokens=False)])
    assert vocab in tokens and vocab + 1 in tokens
    with torch.no_grad():
        diff = (with_adapter(tokens).logits - model.eval()(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff
