"""Chat templates: Jinja strings rendered as transformers renders them, plus the spans each message occupies.

The template comes from the model's tokenizer folder (``chat_template`` in
tokenizer_config.json, or chat_template.jinja), a built-in name
(``data.template=chatml|llama3``) or a ``.jinja`` file. Spans are characters
of the rendering of the WHOLE conversation. Message ``k`` spans from the end of
``render(messages[:k])`` (for assistant turns: with the generation prompt, so
the ``<|im_start|>assistant`` header is not part of it) to the end of
``render(messages[:k+1])``, trailing whitespace excluded, as long as those
prefix renderings are prefixes of the whole one. Templates such as Qwen3's or
DeepSeek-R1's render a turn differently once a later turn follows (Qwen3 drops
the think block, R1 strips reasoning while its generation prompt opens a think
block); there the prefix lengths point at the wrong characters, so the message
is located in the whole rendering instead: a marker character put at the end
of its content shows where the content ends, the end-of-turn text the template prints
after it (as in the prefix rendering) must follow it there, and the reply
starts where the generation prompt and the whole rendering part. A template
for which that is impossible (content printed twice or not at all, earlier
turns rewritten, an end-of-turn text that differs) is refused with a message.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Dict, List, Optional, Tuple

from megatron_swift.data.errors import DataError

BUILTIN: Dict[str, str] = {
    # Qwen2/2.5/3 (without thinking) and many others.
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Role markers as plain text and <|endoftext|> closing each turn: for the byte tokenizer (demo, tests).
    "plain": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    # Llama 3.x instruct.
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
}


class TemplateError(ValueError):
    """A conversation the template cannot render or mask; the caller adds file and line."""


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of the rendered text that message ``index`` produced."""

    index: int
    start: int
    end: int


def _compile(source: str):
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}`` blocks (transformers' assistant-mask marker) render their body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                  ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, name: str, special: Optional[Dict[str, str]] = None):
        self.name = name
        self.special = dict(special or {})
        self._template = _compile(source)

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except TemplateError:
            raise
        except Exception as e:  # jinja errors: undefined variables, bad types
            raise TemplateError(f"chat template {self.name} failed: {e}") from None

    def spans(self, messages: List[dict]) -> Tuple[str, List[Span]]:
        """The rendered conversation and the character span of every message (see the module docstring)."""
        text = self.render(messages)
        spans, previous = [], 0
        for k, message in enumerate(messages):
            start = previous
            if message["role"] == "assistant":
                start = max(previous, self._reply_start(messages, k, text, previous))
            end, previous = self._turn_end(messages, k, text, start)
            spans.append(Span(k, start, end))
        return text, spans

    def _reply_start(self, messages: List[dict], k: int, text: str, previous: int) -> int:
        """Where assistant message ``k``'s reply starts in ``text``: after its generation prompt."""
        head = self.render(messages[:k], add_generation_prompt=True)
        if text.startswith(head):
            return len(head)
        # The prompt is not in the whole rendering (DeepSeek-R1's opens a think block that earlier turns lack):
        # the reply starts where prompt and turn part. The content is replaced by a marker for this, so a reply
        # that happens to begin like the prompt's tail cannot move the cut into the reply.
        marker = self._marker(messages, k, text)
        probe = self.render(_with_content(messages, k, marker))
        at = self._find_once(probe, marker, messages, k, "inside the whole conversation")
        cut = len(os.path.commonprefix([head, probe[:at]]))
        if cut < previous or text[:cut] != probe[:cut]:
            raise self._refusal(messages, k, f"the template renders the first {k} messages differently inside "
                                             f"the whole conversation than as the prompt of message {k}")
        return cut

    def _turn_end(self, messages: List[dict], k: int, text: str, start: int) -> Tuple[int, int]:
        """(end of message ``k``'s span in ``text``, where the next message starts): the content and the
        end-of-turn text after it, not the whitespace that follows."""
        alone = self.render(messages[: k + 1])
        if text.startswith(alone):  # the turn renders the same as the last one and inside the whole
            return start + len(text[start:len(alone)].rstrip()), len(alone)
        # The turn renders differently once later turns follow (Qwen3's think block of the last turn): locate
        # the end of its content in the whole rendering, then the end-of-turn text it has as the last turn.
        marker = self._marker(messages, k, text)
        content_end, marked = self._content_end(messages, k, text, marker, start)
        marked_alone = self.render(_with_content(messages[: k + 1], k, marked))
        tail = marked_alone[self._find_once(marked_alone, marker, messages, k, "as the last message") + len(marker):]
        closing = tail.rstrip()
        if not text.startswith(closing, content_end):
            raise self._refusal(messages, k, f"its end-of-turn text as the last message ({closing!r}) is not what "
                                             "follows it inside the whole conversation")
        end = content_end + len(closing)
        return end, end + len(os.path.commonprefix([tail[len(closing):], text[end:]]))

    def _content_end(self, messages: List[dict], k: int, text: str, marker: str, start: int) -> Tuple[int, str]:
        """Where message ``k``'s content ends in ``text`` (not before ``start``, where its span starts), and its
        content with the ``marker`` that showed it.

        The marker goes before the content's trailing whitespace (which templates may trim, like llama3's
        ``| trim``, and which the masked end leaves out anyway), else at the very end (for a content whose last
        visible character belongs to markup the template strips, like Qwen3 keeping only what follows
        ``</think>``). It must show up exactly once and, removed, give back the whole rendering."""
        content = messages[k]["content"]
        body = content.rstrip()
        problems = []
        for marked in dict.fromkeys([body + marker + content[len(body):], content + marker]):
            located = self.render(_with_content(messages, k, marked))
            problem = _marker_problem(located, marker, text, start)
            if problem is None:
                return located.index(marker), marked
            problems.append(problem)
        raise self._refusal(messages, k, problems[0])

    def _marker(self, messages: List[dict], k: int, text: str) -> str:
        """A private-use character found neither in the rendering nor in any message, to mark message ``k``."""
        if not isinstance(messages[k]["content"], str):
            raise self._refusal(messages, k, "its content is not a string and cannot be located")
        taken = text + "".join(str(m.get("content", "")) for m in messages)
        return next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in taken)

    def _find_once(self, rendered: str, marker: str, messages: List[dict], k: int, where: str) -> int:
        """Where the marker put into message ``k``'s content appears; refused unless exactly once."""
        count = rendered.count(marker)
        if count != 1:
            raise self._refusal(messages, k, f"the template does not print its content {where}" if count == 0
                                else f"the template prints its content more than once {where}")
        return rendered.index(marker)

    def _refusal(self, messages: List[dict], k: int, reason: str) -> TemplateError:
        """The error for a message whose span cannot be located exactly, saying what to do instead."""
        return TemplateError(f"chat template {self.name} cannot be masked exactly: message {k} "
                             f"({messages[k]['role']}): {reason}, so its loss mask would be wrong; point "
                             "data.template at a .jinja file that prints each turn once and the same way wherever "
                             f"it stands, or at a built-in one (data.template={'|'.join(BUILTIN)})")


def _marker_problem(located: str, marker: str, text: str, start: int) -> Optional[str]:
    """Why ``located``, the whole rendering with a marker at the end of one message's content, does not show
    where that content ends in ``text`` (the rendering without it); None when it does."""
    count = located.count(marker)
    if count == 0:
        return "the template does not print its content inside the whole conversation"
    if count > 1:
        return "the template prints its content more than once inside the whole conversation"
    if located.replace(marker, "") != text:
        return "the template renders other text differently when its content changes"
    if located.index(marker) < start:
        return "its content ends before its generation prompt does inside the whole conversation"
    return None


def _with_content(messages: List[dict], k: int, content: str) -> List[dict]:
    """The conversation with message ``k``'s content replaced."""
    return messages[:k] + [dict(messages[k], content=content)] + messages[k + 1:]


def load_template(spec: Optional[str], tokenizer_folder: Optional[str]) -> ChatTemplate:
    """``spec``: a built-in name, a .jinja file, or None for the tokenizer folder's own template
    (``plain`` when there is no folder, i.e. the byte tokenizer)."""
    special = _special_tokens(tokenizer_folder)
    if spec in BUILTIN:
        return ChatTemplate(BUILTIN[spec], spec, special)
    if spec:
        if not os.path.isfile(spec):
            raise DataError(spec, None, f"data.template is neither a built-in template ({', '.join(BUILTIN)}) "
                                        "nor a file")
        with open(spec, encoding="utf-8") as f:
            return ChatTemplate(f.read(), spec, special)
    if tokenizer_folder is None:  # the byte tokenizer: no folder, no template of its own
        return ChatTemplate(BUILTIN["plain"], "plain", special)
    source = _folder_template(tokenizer_folder)
    if source is None:
        raise DataError(tokenizer_folder or "data.tokenizer", None, "the tokenizer has no chat template; set "
                        f"data.template to one of {', '.join(BUILTIN)} or a .jinja file")
    return ChatTemplate(source, f"of {tokenizer_folder}", special)


def _tokenizer_config(folder: Optional[str]) -> dict:
    path = os.path.join(folder, "tokenizer_config.json") if folder and os.path.isdir(folder) else None
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _folder_template(folder: Optional[str]) -> Optional[str]:
    if folder and os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
            return f.read()
    template = _tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _special_tokens(folder: Optional[str]) -> Dict[str, str]:
    """bos_token / eos_token strings the template may print (tokenizer_config.json), empty when absent."""
    config = _tokenizer_config(folder)
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        out[key] = (value.get("content") if isinstance(value, dict) else value) or ""
    return out
