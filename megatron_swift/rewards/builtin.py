"""Built-in reward functions: ``accuracy``, ``format``, ``soft_overlong``, ``repetition``.

Parameters are given through factories. Each parametrised reward has a
``make_*`` function returning a configured reward function, and is registered
with that factory, so either

    registry.configure("format", pattern=r"^<answer>.*</answer>$")   # replaces the registered "format"
    fn = builtin.make_format(pattern=r"^<answer>.*</answer>$")        # a new function, registry untouched

works. ``format`` and ``repetition`` are registered with their defaults;
``soft_overlong`` has no sensible default length and raises until configured.
"""
from __future__ import annotations

import importlib
import math
import re
import threading
from fractions import Fraction
from typing import Any, Callable, List, Optional, Sequence

from megatron_swift.rewards.registry import reward

DEFAULT_FORMAT_PATTERN = r"^<think>.*?</think>\s*<answer>.*?</answer>$"

# Seconds math-verify may spend parsing or comparing one answer (signal-based, main thread only).
MATH_VERIFY_TIMEOUT = 5


def completion_text(completion: Any) -> str:
    """The text of a completion: a str, or the content of the last message of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a str, got {type(completion).__name__}")


# ---------------------------------------------------------------------------------------- accuracy

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# A number: \frac{a}{b}, a/b, or a decimal with optional thousands separators.
_NUMBER = re.compile(r"\\d?frac\{\s*-?\d+\s*\}\{\s*-?\d+\s*\}|-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\d?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}")


def _load_math_verify():
    """The ``math_verify`` module, or None when it is not installed (then accuracy falls back to exact match)."""
    try:
        return importlib.import_module("math_verify")
    except ImportError:
        return None


def _answer_region(text: str) -> str:
    """The content of the last ``<answer>...</answer>``, or the whole text when there is none."""
    found = _ANSWER_TAG.findall(text)
    return found[-1] if found else text


def _last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: no usable answer


def _normalise(s: str) -> str:
    """Strip whitespace (all of it), ``$`` and trailing periods."""
    return "".join(s.replace("$", "").split()).rstrip(".")


def _as_number(s: str) -> Optional[Fraction]:
    """``s`` (already normalised) as an exact number: integer, decimal, ``a/b`` or ``\\frac{a}{b}``; else None."""
    m = _FRAC.fullmatch(s)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return Fraction(num, den) if den else None
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,000 -> 1000
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str) -> str:
    """The final answer in ``text`` for the exact-match fallback, normalised.

    Inside the last ``<answer>`` block (or the whole text): the last
    ``\\boxed{}``; else the region itself when it is a number; else its last
    number; else the whole region.
    """
    region = _answer_region(text)
    boxed = _last_boxed(region)
    if boxed is not None:
        return _normalise(boxed)
    whole = _normalise(region)
    if _as_number(whole) is not None:
        return whole
    numbers = _NUMBER.findall(region)
    return _normalise(numbers[-1]) if numbers else whole


def exact_match(solution: str, completion: str) -> float:
    """1.0 when the final answers agree: numerically if both are numbers, else as case-folded text."""
    gold, answer = extract_answer(solution), extract_answer(completion)
    if not answer:
        return 0.0
    g, a = _as_number(gold), _as_number(answer)
    if g is not None and a is not None:
        return float(g == a)
    return float(gold.casefold() == answer.casefold())


def _math_verify_score(mv, solution: str, completion: str) -> Optional[float]:
    """math-verify's verdict, or None when it cannot parse the reference answer."""
    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    timeout = MATH_VERIFY_TIMEOUT if threading.current_thread() is threading.main_thread() else None
    gold = mv.parse(solution, parsing_timeout=timeout)
    if not gold:
        return None
    answer = mv.parse(_answer_region(completion), parsing_timeout=timeout)
    if not answer:
        return 0.0
    return float(bool(mv.verify(gold, answer, timeout_seconds=timeout)))


def accuracy_of(solution: Any, completion: str, mv=None) -> Optional[float]:
    """1.0/0.0 for one completion against its reference ``solution``; None when there is no reference.

    With math-verify (``mv``) the answer (inside the last ``<answer>`` block if
    any) is parsed and compared symbolically; a reference it cannot parse (plain
    text such as "Paris") and runs without math-verify use ``exact_match``.
    """
    if solution is None or (isinstance(solution, str) and not solution.strip()):
        return None
    solution = str(solution)
    if mv is not None:
        score = _math_verify_score(mv, solution, completion)
        if score is not None:
            return score
    return exact_match(solution, completion)


@reward("accuracy")
def accuracy(prompts: Sequence[Any], completions: Sequence[Any], solution: Optional[Sequence[Any]] = None,
             **_: Any) -> List[Optional[float]]:
    """Math accuracy against the ``solution`` column: 1.0 right, 0.0 wrong, None for rows without a solution."""
    if solution is None:
        raise ValueError("reward 'accuracy' needs a 'solution' column (the reference answer of each row)")
    mv = _load_math_verify()
    return [accuracy_of(s, completion_text(c), mv) for s, c in zip(solution, completions)]


# ------------------------------------------------------------------------------------------ format

def make_format(pattern: str = DEFAULT_FORMAT_PATTERN, flags: int = re.DOTALL) -> Callable[..., List[float]]:
    """A reward: 1.0 when ``re.search(pattern, completion, flags)`` finds a match, else 0.0.

    ``re.search`` lets the pattern decide the anchoring: the default is
    anchored with ``^...$`` so the whole completion must have the shape.
    An invalid pattern raises ValueError here, not at the first batch.
    """
    try:
        regex = re.compile(pattern, flags)
    except re.error as e:
        raise ValueError(f"reward 'format': invalid pattern {pattern!r}: {e}") from e

    def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> List[float]:
        """1.0 for completions the format pattern matches, 0.0 otherwise."""
        return [1.0 if regex.search(completion_text(c)) else 0.0 for c in completions]

    format_reward.pattern = pattern
    return format_reward


reward("format", factory=make_format)(make_format())


# ----------------------------------------------------------------------------------- soft_overlong

def soft_overlong_penalty(length: int, max_completion_length: int, buffer: int) -> float:
    """DAPO's soft over-length penalty for one completion of ``length`` tokens.

    0 up to ``L - B``; then linear from 0 down to -1 at ``L``; -1 beyond ``L``.
    """
    threshold = max_completion_length - buffer
    if length <= threshold:
        return 0.0
    if length <= max_completion_length:
        return (threshold - length) / buffer
    return -1.0


def make_soft_overlong(max_completion_length: int, buffer: int) -> Callable[..., List[float]]:
    """A reward applying ``soft_overlong_penalty`` to the ``completion_lengths`` column (token counts)."""
    if not isinstance(max_completion_length, int) or max_completion_length <= 0:
        raise ValueError(f"reward 'soft_overlong': max_completion_length must be a positive int, "
                         f"got {max_completion_length!r}")
    if not isinstance(buffer, int) or not 0 < buffer <= max_completion_length:
        raise ValueError(f"reward 'soft_overlong': buffer must be an int in 1..max_completion_length "
                         f"({max_completion_length}), got {buffer!r}")

    def soft_overlong(prompts: Sequence[Any], completions: Sequence[Any],
                      completion_lengths: Optional[Sequence[int]] = None, **_: Any) -> List[float]:
        """Soft over-length penalty of each completion from its token count."""
        if completion_lengths is None:
            raise ValueError("reward 'soft_overlong' needs a 'completion_lengths' column "
                             "(the number of generated tokens of each completion)")
        return [soft_overlong_penalty(int(n), max_completion_length, buffer) for n in completion_lengths]

    soft_overlong.max_completion_length = max_completion_length
    soft_overlong.buffer = buffer
    return soft_overlong


def _soft_overlong_unconfigured(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> List[float]:
    """Placeholder until the lengths are known: raises with what to call."""
    raise ValueError("reward 'soft_overlong' is not configured: call "
                     "registry.configure('soft_overlong', max_completion_length=L, buffer=B) first")


reward("soft_overlong", factory=make_soft_overlong)(_soft_overlong_unconfigured)


# -------------------------------------------------------------------------------------- repetition

def repetition_penalty(text: str, ngram_size: int, max_penalty: float) -> float:
    """``max_penalty`` times the fraction of repeated word n-grams in ``text`` (lower-cased, split on whitespace).

    The fraction is ``1 - distinct / total`` over the ``len(words) - n + 1``
    n-grams; text with fewer than ``n`` words scores 0.
    """
    words = text.lower().split()
    total = len(words) - ngram_size + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(words[i:i + ngram_size]) for i in range(total)})
    return (1.0 - distinct / total) * max_penalty + 0.0  # + 0.0 turns -0.0 into 0.0


def make_repetition(ngram_size: int = 3, max_penalty: float = -1.0) -> Callable[..., List[float]]:
    """A reward penalising repeated word n-grams (``repetition_penalty``), between ``max_penalty`` and 0."""
    if not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"reward 'repetition': ngram_size must be an int >= 1, got {ngram_size!r}")
    if not isinstance(max_penalty, (int, float)) or max_penalty > 0 or math.isnan(max_penalty):
        raise ValueError(f"reward 'repetition': max_penalty must be <= 0 (a penalty), got {max_penalty!r}")

    def repetition(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> List[float]:
        """N-gram repetition penalty of each completion."""
        return [repetition_penalty(completion_text(c), ngram_size, float(max_penalty)) for c in completions]

    repetition.ngram_size = ngram_size
    repetition.max_penalty = max_penalty
    return repetition


reward("repetition", factory=make_repetition)(make_repetition())
