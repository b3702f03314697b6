"""A generative reward model: an LLM judge scores each completion.

``JudgeReward(generate, template, pattern, scale)`` renders one judge prompt per
completion from a Jinja2 template, sends them all to ``generate`` in ONE call
(so the rollout engine batches them), and reads a number out of each reply
with a regular expression.

* Template variables: ``prompt`` (text of the last user message), ``messages``
  (the prompt messages), ``completion`` and every column of the row (these
  three names win over columns of the same name). Rendering is sandboxed
  (``ImmutableSandboxedEnvironment``: templates come from config files) and
  strict (``StrictUndefined``): a misspelled variable is an error naming it,
  at construction when ``columns`` is given, else at the first call. Variables
  the template tests with ``is defined`` may be absent.
* Parsing: the score is read from the reply's LAST non-empty line only, where the question asks for
  it; the default pattern wants that line to be ``Score: N`` (``**Score:** N``, ``Score = N`` and
  ``Score: N/10`` too). The pattern's first group (else the whole match) is the number; it is clamped
  to ``score_range`` and divided by ``scale`` when given (``scale=10`` maps the default 0-10 score to
  0-1). A number elsewhere in the reply ("7 of 10 steps are right...") is not a score.
* A reply without a score on its last line, or cut off at the token limit (``generate`` returns a
  ``JudgeReply`` with ``truncated=True``), scores 0.0 and is counted: ``malformed`` (since
  construction) and ``last_malformed`` (in the last call) are there for metrics.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

DEFAULT_TEMPLATE = """You are grading an answer to a question.

Question:
{{ prompt }}

Answer:
{{ completion }}
{% if solution is defined %}
Reference answer:
{{ solution }}
{% endif %}
Rate the answer from 0 (wrong or useless) to 10 (correct and complete). \
End your reply with "Score: N" where N is the score."""

DEFAULT_PATTERN = r"(?i)^\W*(?:final\s+)?score\W*?[:=][\s*_]*(-?\d+(?:\.\d+)?)[\s*_]*(?:/\s*10)?[\s*_.]*$"
DEFAULT_RANGE = (0.0, 10.0)


class JudgeReply(str):
    """A judge's reply; ``truncated`` when generation stopped at the token limit, not at its end."""

    truncated = False


def truncated_reply(text: str) -> JudgeReply:
    reply = JudgeReply(text)
    reply.truncated = True
    return reply

# Names the judge itself provides to the template.
RESERVED = ("prompt", "messages", "completion")


class JudgeTemplateError(ValueError):
    """The judge template does not parse or uses a variable that is not provided."""


class JudgeError(RuntimeError):
    """``generate`` returned something other than one string per judge prompt."""


def last_user_text(messages: Any) -> str:
    """Text of the last user message (text parts joined when the content is a list of parts)."""
    if isinstance(messages, str):
        return messages
    for m in reversed(list(messages or [])):
        if isinstance(m, Mapping) and m.get("role") == "user":
            return _content_text(m.get("content"))
    return ""


def _content_text(content: Any) -> str:
    """A message content as text: a str, or the ``text`` parts of a multimodal list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text")
    return str(content)


def _variables(env, source: str) -> tuple:
    """(variables the template reads, those it only needs when ``is defined``)."""
    from jinja2 import meta, nodes

    tree = env.parse(source)
    used = set(meta.find_undeclared_variables(tree))
    guarded = {t.node.name for t in tree.find_all(nodes.Test)
               if t.name in ("defined", "undefined") and isinstance(t.node, nodes.Name)}
    return used, guarded


class JudgeReward:
    """A reward function that asks a judge model for a score per completion.

    ``generate(list[str]) -> list[str]`` takes rendered judge prompts (already
    plain text; the caller applies the judge's chat template if it wants one)
    and returns one reply per prompt. See the module docstring for the rest.
    """

    def __init__(self, generate: Callable[[List[str]], Sequence[str]], template: str = DEFAULT_TEMPLATE,
                 pattern: str = DEFAULT_PATTERN, scale: Optional[float] = None,
                 score_range: Sequence[float] = DEFAULT_RANGE, columns: Optional[Iterable[str]] = None):
        from jinja2 import StrictUndefined, TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not callable(generate):
            raise TypeError(f"generate must be callable, got {type(generate).__name__}")
        low, high = (float(v) for v in score_range)
        if not low < high:
            raise ValueError(f"score_range must be (low, high) with low < high, got {tuple(score_range)}")
        if scale is not None and (not isinstance(scale, (int, float)) or scale == 0 or not math.isfinite(scale)):
            raise ValueError(f"scale must be a non-zero number or None, got {scale!r}")
        self.generate = generate
        self.scale = scale
        self.score_range = (low, high)
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"judge pattern {pattern!r} is not a regular expression: {e}") from e

        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        try:
            self.template = env.from_string(template)
            self.variables, self._optional = _variables(env, template)
        except TemplateSyntaxError as e:
            raise JudgeTemplateError(f"judge template line {e.lineno}: {e.message}") from e
        if columns is not None:
            self._check_variables(set(columns))

        self.malformed = 0        # replies without a score, since construction
        self.last_malformed = 0   # ... in the last call
        self.replies = 0          # replies read, since construction
        self.last_replies: List[str] = []  # the last call's raw replies (for logging samples)

    # -- rendering -------------------------------------------------------------------------------

    def _check_variables(self, columns: set) -> None:
        """JudgeTemplateError naming template variables that neither the judge nor the columns provide."""
        missing = sorted(self.variables - self._optional - set(RESERVED) - columns)
        if missing:
            raise JudgeTemplateError(
                f"judge template uses undefined variable(s) {', '.join(missing)}; "
                f"available: {', '.join(sorted(set(RESERVED) | columns))}")

    def render(self, messages: Any, completion: str, row: Mapping[str, Any]) -> str:
        """The judge prompt for one completion; ``row`` holds that row's column values."""
        from jinja2.exceptions import SecurityError, UndefinedError

        if isinstance(messages, str):  # a plain-text prompt
            messages = [{"role": "user", "content": messages}]
        context = {**row, "prompt": last_user_text(messages), "messages": messages, "completion": completion}
        try:
            return self.template.render(context)
        except (UndefinedError, SecurityError) as e:
            raise JudgeTemplateError(f"judge template: {e}; available: {', '.join(sorted(context))}") from e

    # -- parsing ---------------------------------------------------------------------------------

    def parse(self, reply: str) -> Optional[float]:
        """The score on the reply's last non-empty line, clamped and scaled; None when there is none or the
        reply was cut off."""
        if getattr(reply, "truncated", False):
            return None
        lines = [line for line in reply.splitlines() if line.strip()]
        m = self.regex.search(lines[-1].strip()) if lines else None
        if m is None:
            return None
        text = m.group(1) if self.regex.groups else m.group(0)
        try:
            value = float(text)
        except (TypeError, ValueError):  # a custom pattern whose group is not a number, or did not take part
            return None
        if not math.isfinite(value):
            return None
        low, high = self.score_range
        value = min(max(value, low), high)
        return value / self.scale if self.scale is not None else value

    # -- reward function -------------------------------------------------------------------------

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **columns: Sequence[Any]) -> List[float]:
        """Scores of ``completions`` (one batched ``generate`` call); unparsable replies score 0.0."""
        self._check_variables(set(columns))
        judge_prompts = [self.render(p, c, {k: v[i] for k, v in columns.items()})
                         for i, (p, c) in enumerate(zip(prompts, completions))]
        if not judge_prompts:
            self.last_malformed, self.last_replies = 0, []
            return []
        replies = list(self.generate(judge_prompts))
        if len(replies) != len(judge_prompts) or not all(isinstance(r, str) for r in replies):
            raise JudgeError(f"judge generate returned {len(replies)} replies "
                             f"({sorted({type(r).__name__ for r in replies})}) for {len(judge_prompts)} prompts; "
                             f"expected one str each")
        scores = [self.parse(r) for r in replies]
        self.last_malformed = sum(s is None for s in scores)
        self.malformed += self.last_malformed
        self.replies += len(replies)
        self.last_replies = replies
        return [0.0 if s is None else s for s in scores]

    def stats(self) -> Dict[str, float]:
        """Metrics of the last call: malformed replies, their count and fraction."""
        n = len(self.last_replies)
        return {"malformed": float(self.last_malformed), "malformed_frac": self.last_malformed / n if n else 0.0}
