"""Benchmark the SFT data pipeline: JSON -> chat template -> tokenize -> loss mask -> pack, on one CPU core.

    python tools/bench/data_bench.py [--rows 4000] [--turns 2] [--seq 4096]

Trains a byte-level BPE tokenizer (16k vocabulary, ChatML specials) on
synthetic text, writes synthetic conversations, and times the whole pipeline
(megatron_swift.data.sft.sft_source with packing) in this process. Prints
tokens/s per core and the ratio to what one H100 consumes training an 8B
model (about 14,000 tokens/s): above 1, one core keeps one GPU fed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

H100_8B_TOKENS_PER_S = 14_000
WORDS = ("the model learns to answer questions about data pipelines tokens packing masks gradients layers "
         "experts attention throughput memory checkpoint training cluster node rank batch sequence loss").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def make_tokenizer(folder: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    trainer = trainers.BpeTrainer(vocab_size=16000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((_text(rng, 50) for _ in range(5000)), trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "<|im_end|>"}, f)


def make_rows(path: str, rows: int, turns: int) -> None:
    rng = random.Random(1)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            messages = [{"role": "system", "content": "You are a helpful assistant."}]
            for _ in range(turns):
                messages += [{"role": "user", "content": _text(rng, rng.randint(10, 60))},
                             {"role": "assistant", "content": _text(rng, rng.randint(20, 200))}]
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    from megatron_swift.data.sft import sft_source
    from megatron_swift.data.tokenizer import HFTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        make_tokenizer(work)
        data = os.path.join(work, "sft.jsonl")
        make_rows(data, args.rows, args.turns)
        cfg = SimpleNamespace(format="auto", loss_on="assistant", truncation="truncate", on_error="error",
                              packing=True, template="chatml", weights=[])
        tokenizer = HFTokenizer(work)
        start = time.perf_counter()
        rows = sft_source([data], cfg, tokenizer, args.seq, "chatml", work)
        seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in rows.samples.ids)
    rate = tokens / seconds
    print(f"{args.rows} conversations x {args.turns} turns -> {tokens} tokens in {len(rows)} packed rows of "
          f"{args.seq} in {seconds:.2f} s on one core")
    print(f"{rate:,.0f} tokens/s per core; x{rate / H100_8B_TOKENS_PER_S:.1f} the ~{H100_8B_TOKENS_PER_S:,} "
          "tokens/s one H100 trains an 8B model at")


if __name__ == "__main__":
    main()
