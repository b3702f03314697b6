"""Code-execution reward: run the completion's Python code against the row's tests in the sandbox.

``code_reward(prompts, completions, tests=...)`` follows the reward calling convention of ``registry``
(one float per completion, ``tests`` a column aligned with the completions). For each completion the
last fenced Python block (```python ... ``` or an untagged ``` ... ```) is run once per test item, each
run in fresh boxes (``rewards/sandbox.py``); the reward is the fraction of the row's test items that
pass (0.0 without a code block or without tests). An item that times out, crashes or is malformed
counts as failed.

Test items (one list per row):

* a string of Python statements, e.g. ``"assert add(1, 2) == 3"``: run by the harness in a box of its
  own against the solution's box, only plain data crossing between them (``rewards/code_harness.py``);
  it passes when the statements run to their end there. Nothing the solution does in its own box (exit
  early, print a marker, install an excepthook, return an object equal to everything) makes it pass;
* ``{"input": "...", "output": "..."}``: the code reads ``input`` on stdin; it passes when it exits with
  status 0 and its stdout equals ``output`` after stripping trailing whitespace of every line and
  trailing empty lines. The expected output never enters the box: the comparison is made here.

A row's tests may also be given as a JSON string of such a list, a single string of asserts, or
APPS-style ``{"inputs": [...], "outputs": [...]}``. The code runs as a script (``__name__ ==
"__main__"``) with empty stdin for assert items. Whatever the code does, that item scores 0; this
function does not raise because of it.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from megatron_swift.rewards import code_harness
from megatron_swift.rewards.builtin import completion_text
from megatron_swift.rewards.sandbox import DEFAULT_UID_BASE, MAIN_FILE, SandboxLimits, SandboxPool

log = logging.getLogger(__name__)

DEFAULT_LIMITS = SandboxLimits()
# ```lang\n body ``` ; the language tag is the first word after the fence
_FENCE = re.compile(r"```[ \t]*([^\n`]*)\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = frozenset({"", "python", "py", "python3", "py3"})


def _text(completion: Any) -> str:
    """A completion's text (builtin.completion_text), or "" for anything that is not one: nothing to run."""
    try:
        return completion_text(completion)
    except TypeError:
        return ""


def extract_code(completion: Any) -> Optional[str]:
    """The body of the last fenced Python (or untagged) code block, None if there is none.

    Blocks tagged with another language (```bash, ```text) are skipped; an unclosed block (a
    completion cut at the length limit) does not count.
    """
    code = None
    for tag, body in _FENCE.findall(_text(completion)):
        words = tag.split()
        if (words[0].lower() if words else "") in _PYTHON_TAGS and body.strip():
            code = body
    return code


def _normalize_output(text: str) -> List[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _row_tests(tests: Any) -> list:
    """One row's test items as a list (see the module docstring for the accepted shapes)."""
    if tests is None:
        return []
    if isinstance(tests, str):
        try:
            decoded = json.loads(tests)
        except ValueError:
            return [tests] if tests.strip() else []
        return _row_tests(decoded) if isinstance(decoded, (list, dict)) else [tests]
    if isinstance(tests, dict):
        if "inputs" in tests and "outputs" in tests:
            return [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
        return [tests]
    return list(tests)


_HARNESS = Path(code_harness.__file__).read_bytes()


def _assert_item(pool: SandboxPool, code: str, test: str) -> Tuple[bool, str]:
    """(passed, reason) of one assert item: the harness box runs ``test``, the solution's box serves it."""
    nonce = secrets.token_hex(16)
    harness = ({"harness.py": _HARNESS}, ["harness.py", "judge", "{read}", "{write}"],
               json.dumps({"nonce": nonce, "test": test}))
    solution = ({"harness.py": _HARNESS, MAIN_FILE: code.encode("utf-8")},
                ["harness.py", "serve", "{read}", "{write}", MAIN_FILE], "")
    result, served = pool.run_linked(harness, solution)
    if not result.ok:
        return False, result.reason or f"harness exit {result.returncode}"
    lines = result.stdout.rstrip("\n").rsplit("\n", 1)
    head, _, verdict = lines[-1].partition(" ")
    if head != nonce:
        return False, "no verdict"
    verdict = json.loads(verdict)
    return verdict.get("passed") is True, verdict.get("error", "") or served.reason


def _io_item(pool: SandboxPool, code: str, item: dict) -> Tuple[bool, str]:
    """(passed, reason) of one stdin/stdout item, compared here: the expected output stays outside."""
    stdin = item["input"] if isinstance(item["input"], str) else "\n".join(map(str, item["input"]))
    expected = item["output"] if isinstance(item["output"], str) else "\n".join(map(str, item["output"]))
    result = pool.run(code, stdin)
    if not result.ok:
        return False, result.reason or f"exit {result.returncode}"
    return _normalize_output(result.stdout) == _normalize_output(expected), ""


def _item_runner(item: Any):
    """The function that runs one test item, or None for a malformed item."""
    if isinstance(item, str):
        return _assert_item
    if isinstance(item, dict) and "input" in item and "output" in item:
        return _io_item
    return None


def _score_rows(codes: Sequence[Optional[str]], row_tests: Sequence[list], limits: SandboxLimits,
                workers: int, isolation: str, uid_base: int = DEFAULT_UID_BASE) -> List[float]:
    totals = [len(items) for items in row_tests]
    work = []
    for row, (code, items) in enumerate(zip(codes, row_tests)):
        for item in items if code is not None else ():
            runner = _item_runner(item)
            if runner is None:
                log.warning("code reward: row %d has a malformed test item %r (counted as failed)", row, item)
                continue
            work.append((row, runner, code, item))
    passed = [0] * len(codes)
    if work:
        with SandboxPool(max(1, min(workers, len(work))), limits, isolation, uid_base) as pool:
            futures = [pool.submit(runner, code, item) for _row, runner, code, item in work]
            outcomes = [f.result() for f in futures]
        errors = [why for ok, why in outcomes if why.startswith("sandbox error")]
        if errors:
            log.warning("code reward: %d of %d runs could not be started (first: %s)", len(errors), len(work),
                        errors[0])
        for (row, *_), (ok, _why) in zip(work, outcomes):
            passed[row] += ok
    return [p / t if t else 0.0 for p, t in zip(passed, totals)]


def score_one(code: Optional[str], tests: Any, limits: SandboxLimits = DEFAULT_LIMITS, isolation: str = "bwrap",
              workers: int = 1) -> float:
    """Fraction of ``tests`` (one row's items) that ``code`` passes; 0.0 for no code or no tests."""
    return _score_rows([code], [_row_tests(tests)], limits, workers, isolation)[0]


def code_reward(prompts: Sequence[Any], completions: Sequence[Any], tests: Optional[Sequence[Any]] = None, *,
                limits: SandboxLimits = DEFAULT_LIMITS, workers: int = 4, isolation: str = "bwrap",
                uid_base: int = DEFAULT_UID_BASE, **columns: Any) -> List[float]:
    """Per completion: passed / total of its row's tests (see the module docstring)."""
    if tests is None:
        log.warning("code reward: the rows have no 'tests' column; every completion scores 0")
        return [0.0] * len(completions)
    if len(tests) != len(completions):
        raise ValueError(f"code reward: {len(tests)} test lists for {len(completions)} completions")
    codes = [extract_code(c) for c in completions]
    return _score_rows(codes, [_row_tests(t) for t in tests], limits, workers, isolation, uid_base)
