"""Write the bundled SFT demo set: small arithmetic conversations in the three accepted row shapes.

`python tools/make_demo_sft.py > megatron_swift/assets/demo_sft.jsonl` (seeded; no download). The
answers follow from the questions, so a tiny model can learn them and the loss visibly falls.
"""
import json
import random
import sys

OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


def qa(rng: random.Random):
    a, b, op = rng.randint(1, 20), rng.randint(1, 20), rng.choice(list(OPS))
    return f"What is {a} {op} {b}?", f"{a} {op} {b} is {OPS[op](a, b)}."


def row(rng: random.Random, i: int) -> dict:
    kind = i % 4
    q1, a1 = qa(rng)
    if kind == 0:  # one turn, messages
        return {"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]}
    if kind == 1:  # two turns with a system prompt, messages
        q2, a2 = qa(rng)
        return {"messages": [{"role": "system", "content": "You answer arithmetic questions."},
                             {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                             {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]}
    if kind == 2:  # ShareGPT
        return {"conversations": [{"from": "human", "value": q1}, {"from": "gpt", "value": a1}]}
    return {"instruction": "Answer the question.", "input": q1, "output": a1}  # Alpaca


def main(rows: int = 800, seed: int = 0) -> None:
    rng = random.Random(seed)
    for i in range(rows):
        sys.stdout.write(json.dumps(row(rng, i)) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=800, help="JSONL rows to write to stdout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the questions")
    args = parser.parse_args()
    main(args.rows, args.seed)
