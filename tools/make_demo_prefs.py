"""Write the bundled preference demo set: arithmetic prompts, a correct chosen and an evasive rejected answer.

`python tools/make_demo_prefs.py > megatron_swift/assets/demo_prefs.jsonl` (seeded; no download). The
chosen answers share a learnable form, so DPO's reward accuracy rises quickly on a tiny model. Both
row shapes are used: messages + rejected_response, and prompt / chosen / rejected.
"""
import json
import random
import sys

REFUSALS = ["I do not know.", "Ask someone else.", "That is hard to say.", "No idea, sorry."]


def main(rows: int = 400, seed: int = 0) -> None:
    rng = random.Random(seed)
    for i in range(rows):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        question, good, bad = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", rng.choice(REFUSALS)
        if i % 2:
            row = {"prompt": question, "chosen": good, "rejected": bad}
        else:
            row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": good}],
                   "rejected_response": bad}
        sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
