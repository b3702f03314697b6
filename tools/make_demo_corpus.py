"""Write the bundled demo corpus: synthetic English-like sentences from a small seeded grammar.

The project ships its own data so the README demo and tests need no download:
`python tools/make_demo_corpus.py > megatron_swift/assets/demo_corpus.jsonl`.
"""
import json
import random
import sys

SUBJECTS = ["the old sailor", "a young engineer", "the small robot", "my neighbour", "the quiet teacher",
            "a tired student", "the village baker", "an honest farmer", "the clever fox", "a curious child"]
VERBS = ["repairs", "paints", "carries", "studies", "finds", "builds", "measures", "writes about", "watches",
         "cleans"]
OBJECTS = ["a wooden boat", "the red door", "an old map", "the broken clock", "a bright lamp", "the long bridge",
           "a heavy box", "the garden wall", "a paper kite", "the stone tower"]
PLACES = ["near the river", "in the market", "on the hill", "by the harbour", "under the bridge",
          "behind the school", "at the station", "in the forest"]
TIMES = ["every morning", "before the rain", "after dinner", "on sunday", "at noon", "late at night",
         "in the spring", "when the bell rings"]
ENDINGS = ["and smiles.", "without a word.", "with great care.", "for the third time.", "and then rests.",
           "while singing softly.", "as the sun sets.", "and counts to ten."]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)} "
    s += f"{rng.choice(TIMES)} {rng.choice(ENDINGS)}"
    return s[0].upper() + s[1:]


def main(rows: int = 1200, seed: int = 0) -> None:
    rng = random.Random(seed)
    for _ in range(rows):
        text = " ".join(sentence(rng) for _ in range(rng.randint(1, 3)))
        sys.stdout.write(json.dumps({"text": text}) + "\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1200, help="JSONL rows to write to stdout")
    parser.add_argument("--seed", type=int, default=0, help="seed of the grammar's choices")
    args = parser.parse_args()
    main(args.rows, args.seed)
