"""Code-execution reward: run the completion's Python code against the row's tests in a sandbox.

``code_reward(prompts, completions, tests=...)`` follows the reward calling
convention of ``registry`` (one float per completion, ``tests`` a column
aligned with the completions). For each completion the last fenced Python
block (```python ... ``` or an untagged ``` ... ```) is run once per test item,
each run a fresh ``sandbox.run_python`` process; the reward is the fraction of
the row's test items that pass (0.0 without a code block or without tests).

Test items (one list per row):

* a string of Python statements, e.g. ``"assert add(1, 2) == 3"``: appended
  after the code; it passes when the program runs to its end (exit status 0 and
  a random end marker printed after the tests, so ``sys.exit(0)`` or
  ``os._exit(0)`` before the asserts does not pass);
* ``{"input": "...", "output": "..."}``: the code reads ``input`` on stdin; it
  passes when it exits with status 0 and its stdout equals ``output`` after
  stripping trailing whitespace of every line and trailing empty lines.

A row's tests may also be given as a JSON string of such a list, a single
string of asserts, or APPS-style ``{"inputs": [...], "outputs": [...]}``.
The code runs as a script (``__name__ == "__main__"``) with empty stdin for
assert items. Whatever the code does (exception, timeout, memory or output
limit, crash), that item scores 0; this function does not raise because of it.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any, List, Optional, Sequence, Tuple

from megatron_swift.rewards.builtin import completion_text
from megatron_swift.rewards.sandbox import SandboxJob, SandboxLimits, SandboxPool, SandboxResult

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


def _job(code: str, item: Any) -> Tuple[Optional[SandboxJob], Any]:
    """(sandbox job, what a passing run must show) for one test item; (None, None) if malformed."""
    if isinstance(item, str):
        marker = "sandbox-tests-passed-" + secrets.token_hex(8)
        program = f"{code}\n\n# ---- tests ----\n{item}\n\nprint({marker!r}, flush=True)\n"
        return SandboxJob(program, ""), ("marker", marker)
    if isinstance(item, dict) and "input" in item and "output" in item:
        stdin = item["input"] if isinstance(item["input"], str) else "\n".join(map(str, item["input"]))
        expected = item["output"] if isinstance(item["output"], str) else "\n".join(map(str, item["output"]))
        return SandboxJob(code, stdin), ("stdout", _normalize_output(expected))
    return None, None


def _passed(result: SandboxResult, check: Tuple[str, Any]) -> bool:
    if not result.ok:
        return False
    kind, value = check
    if kind == "marker":
        return value in result.stdout.splitlines()
    return _normalize_output(result.stdout) == value


def _score_rows(codes: Sequence[Optional[str]], row_tests: Sequence[list], limits: SandboxLimits,
                workers: int, isolate: str) -> List[float]:
    jobs, checks, owners = [], [], []
    totals = [len(items) for items in row_tests]
    for row, (code, items) in enumerate(zip(codes, row_tests)):
        if code is None:
            continue
        for item in items:
            job, check = _job(code, item)
            if job is None:
                log.warning("code reward: row %d has a malformed test item %r (scored 0)", row, item)
                continue
            jobs.append(job)
            checks.append(check)
            owners.append(row)
    passed = [0] * len(codes)
    if jobs:
        with SandboxPool(workers=max(1, min(workers, len(jobs))), limits=limits, isolate=isolate) as pool:
            results = pool.map(jobs)
        errors = [r.reason for r in results if r.reason.startswith(("sandbox error", "spawn failed", "sandbox setup"))]
        if errors:
            log.warning("code reward: %d of %d runs could not be started (first: %s)",
                        len(errors), len(jobs), errors[0])
        for row, result, check in zip(owners, results, checks):
            passed[row] += _passed(result, check)
    return [p / t if t else 0.0 for p, t in zip(passed, totals)]


def score_one(code: Optional[str], tests: Any, limits: SandboxLimits = DEFAULT_LIMITS, isolate: str = "auto",
              workers: int = 1) -> float:
    """Fraction of ``tests`` (one row's items) that ``code`` passes; 0.0 for no code or no tests."""
    return _score_rows([code], [_row_tests(tests)], limits, workers, isolate)[0]


def code_reward(prompts: Sequence[Any], completions: Sequence[Any], tests: Optional[Sequence[Any]] = None, *,
                limits: SandboxLimits = DEFAULT_LIMITS, workers: int = 4, isolate: str = "auto",
                **columns: Any) -> List[float]:
    """Per completion: passed / total of its row's tests (see the module docstring)."""
    if tests is None:
        log.warning("code reward: the rows have no 'tests' column; every completion scores 0")
        return [0.0] * len(completions)
    if len(tests) != len(completions):
        raise ValueError(f"code reward: {len(tests)} test lists for {len(completions)} completions")
    codes = [extract_code(c) for c in completions]
    return _score_rows(codes, [_row_tests(t) for t in tests], limits, workers, isolate)
