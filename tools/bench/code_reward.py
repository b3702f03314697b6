"""Code-reward throughput: test items (sandbox jobs) per second, isolator start-up included, for a batch of
completions scored by ``rewards.code.code_reward`` with its default isolation and limits.

The batch: ``--rows`` completions, each a correct solution with ``--tests`` items, half assert items (the
harness and the solution, two boxes per item) and half stdin/stdout items (one box). ``--tree DIR`` also
times another checkout of the project (e.g. ``git worktree add /tmp/old <commit>``) with the same call; the
two take turns, one batch each per round, and the fastest batch of each counts (a shared machine drifts).

    python tools/bench/code_reward.py                        # this checkout: 32 rows x 4 items, 4 workers
    python tools/bench/code_reward.py --tree /tmp/old --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from megatron_swift.rewards.code import code_reward
rows, tests, workers = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
solution = "```python\nimport sys\ndef add(a, b):\n    return a + b\nif __name__ == '__main__' and not sys.stdin.isatty():\n    data = sys.stdin.read().split()\n    if data:\n        print(add(int(data[0]), int(data[1])))\n```"
items = []
for i in range(tests):
    items.append(f"assert add({i}, 2) == {i + 2}" if i % 2 == 0 else {"input": f"{i} 3", "output": str(i + 3)})
start = time.perf_counter()
out = code_reward([[]] * rows, [solution] * rows, tests=[items] * rows, workers=workers)
elapsed = time.perf_counter() - start
assert out == [1.0] * rows, out
print(json.dumps({"seconds": elapsed, "jobs": rows * tests}))
"""


def _batch(tree: str, args) -> dict:
    proc = subprocess.run([sys.executable, "-c", _WORKER, tree, str(args.rows), str(args.tests), str(args.workers)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: the batch failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32, help="completions in the batch")
    parser.add_argument("--tests", type=int, default=4, help="test items per completion (half assert, half stdin/stdout)")
    parser.add_argument("--workers", type=int, default=4, help="sandbox jobs at once (task.sandbox.workers)")
    parser.add_argument("--rounds", type=int, default=3, help="timed batches of each tree (the fastest counts)")
    parser.add_argument("--tree", default=None, help="another checkout to time with the same call")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    trees = {"this checkout": ROOT, **({"other tree": os.path.abspath(args.tree)} if args.tree else {})}
    best = {name: float("inf") for name in trees}
    jobs = args.rows * args.tests
    for _ in range(args.rounds):
        for name, tree in trees.items():
            best[name] = min(best[name], _batch(tree, args)["seconds"])
    for name in trees:
        print(f"{name:14s} {jobs} jobs in {best[name]:.2f} s: {jobs / best[name]:.1f} jobs/s "
              f"({args.workers} workers, {os.cpu_count()} cores)")
    if args.tree:
        print(f"ratio (this / other): {best['other tree'] / best['this checkout']:.2f}x")


if __name__ == "__main__":
    main()
