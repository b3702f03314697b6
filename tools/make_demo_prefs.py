"""Write the bundled preference demo sets: arithmetic prompts, correct answers preferred to evasive ones.

`python tools/make_demo_prefs.py > megatron_swift/assets/demo_prefs.jsonl` writes pairs for task=dpo/rm:
a correct chosen and an evasive rejected answer. `python tools/make_demo_prefs.py kto >
megatron_swift/assets/demo_kto.jsonl` writes single completions for task=kto, labelled desirable (correct)
or not (evasive). Seeded, no download. The correct answers share a learnable form, so rewards separate
quickly on a tiny model. Both row shapes of each kind are used.
"""
import json
import random
import sys

REFUSALS = ["I do not know.", "Ask someone else.", "That is hard to say.", "No idea, sorry."]


def _pair(i: int, question: str, good: str, bad: str, rng) -> dict:
    if i % 2:
        return {"prompt": question, "chosen": good, "rejected": bad}
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": good}],
            "rejected_response": bad}


def _labelled(i: int, question: str, good: str, bad: str, rng) -> dict:
    label = rng.random() < 0.5
    answer = good if label else bad
    if i % 2:
        return {"prompt": question, "completion": answer, "label": label}
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "label": label}


def main(kind: str = "pairs", rows: int = 400) -> None:
    rng = random.Random(0 if kind == "pairs" else 1)
    make = _pair if kind == "pairs" else _labelled
    for i in range(rows):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        row = make(i, f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", rng.choice(REFUSALS), rng)
        sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", nargs="?", default="pairs", choices=["pairs", "kto"],
                        help="pairs (DPO/RM rows) or kto (labelled completions)")
    parser.add_argument("--rows", type=int, default=400, help="JSONL rows to write to stdout")
    args = parser.parse_args()
    main(args.kind, args.rows)
