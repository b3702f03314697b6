"""GRPO with the code-execution reward (issue 25): a tiny policy learns, through the real sandbox, to write
the program that passes the row's tests.

The policy writes whole programs as single tokens (a word-level tokenizer whose vocabulary holds twenty
fenced Python blocks), so a random policy finds the right one about once in twenty tries; each row's tests
are one stdin/stdout item and one assert item (run by the harness against the solution's box). Only the
block that prints and returns 7 passes both (1.0); the one that only prints 7 passes half (0.5).
"""
from __future__ import annotations

import json

from tests.conftest import read_metrics, run_train


def _programs():
    both = [f"```python\ndef f():\n    return {k}\nprint(f())\n```" for k in range(10)]
    printing = [f"```python\nprint({k})\n```" for k in range(10)]
    return both + printing


def _tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "<|user|>": 2, "<|assistant|>": 3, "write": 4, "the": 5, "program": 6}
    for program in _programs():
        vocab[program] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>", "<|user|>", "<|assistant|>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def test_grpo_learns_to_write_passing_code(tmp_path):
    _tokenizer(tmp_path / "tok")
    rows = [{"messages": [{"role": "user", "content": "write the program"}],
             "tests": [{"input": "", "output": "7"}, "assert f() == 7"]}] * 64
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    proc = run_train(2, ["+model=qwen3", "train.precision=fp32", "logging.tensorboard=false", "task=grpo",
                         "task.rewards=[code]", "data=prompts", f"data.path=[{data}]", f"data.tokenizer={tmp_path / 'tok'}",
                         "data.template=plain", "task.max_completion_length=2", "task.num_generations=8",
                         "task.beta=0", "train.seq_length=32", "train.global_batch_size=32", "train.micro_batch_size=8",
                         "train.lr=2e-2", "train.lr_warmup_iters=0", "train.lr_decay_style=constant",
                         "train.train_iters=10", "task.sandbox.workers=4", f"train.output_dir={out}"],
                     timeout=600)
    assert "code sandbox: bubblewrap" in proc.stdout, proc.stdout[-2000:]
    rewards = [m["rewards/code"] for m in read_metrics(out)]
    assert rewards[0] < 0.3 and max(rewards[-3:]) > 0.7, rewards
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert any("return 7" in c["completion"] for c in completions[-4:]), completions[-4:]
