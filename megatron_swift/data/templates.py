"""Chat templates: Jinja strings rendered as transformers renders them, plus the spans each message occupies.

The template comes from the model's tokenizer folder (``chat_template`` in
tokenizer_config.json, or chat_template.jinja), a built-in name
(``data.template=chatml|llama3``) or a ``.jinja`` file. Which characters
belong to which message is found by rendering prefixes of the conversation:
message ``k`` spans from the end of ``render(messages[:k])`` (for assistant
turns: with the generation prompt, so the ``<|im_start|>assistant`` header is
not part of it) to the end of ``render(messages[:k+1])``, trailing whitespace
excluded. A template for which a prefix does not render as a prefix of the
whole (e.g. one that rewrites earlier turns) is refused with a message, since
its masks would be wrong.
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
        """The rendered conversation and the character span of every message."""
        text = self.render(messages)
        spans, previous = [], 0
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                head = self.render(messages[:k], add_generation_prompt=True)
                self._check_prefix(head, text, k)
                previous = max(previous, len(head))
            end = len(self.render(messages[: k + 1]))
            self._check_prefix(text[:end], text, k)
            body_end = previous + len(text[previous:end].rstrip())
            spans.append(Span(k, previous, body_end))
            previous = end
        return text, spans

    def _check_prefix(self, head: str, text: str, k: int) -> None:
        if not text.startswith(head):
            raise TemplateError(f"chat template {self.name} renders the first {k} messages differently inside the "
                                "whole conversation, so turns cannot be masked; choose another data.template "
                                f"(built in: {', '.join(BUILTIN)})")


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
