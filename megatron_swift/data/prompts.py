"""Prompt rows for on-policy tasks (task=grpo): the conversation so far, and every other column for the rewards.

Row shapes: ``{"messages": [...prompt turns...], "solution": ..., "tests": [...], ...}`` (the turns end with
a user turn; a trailing assistant turn is refused, so that nothing is silently dropped) or
``{"prompt": "text", ...}`` (one user turn). Each prompt is rendered with the chat template and its
generation prompt and tokenised once; a prompt that leaves no room for ``max_completion_length`` new
tokens within ``train.seq_length`` is an error naming its file and line (or is skipped / dropped as
``data.on_error`` / ``data.truncation`` say).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Sequence

from megatron_swift.data.conversations import RowError
from megatron_swift.data.errors import DataError
from megatron_swift.data.files import jsonl_lines, line_rules
from megatron_swift.data.sft import Counts
from megatron_swift.data.templates import TemplateError, load_template

_ROLES = ("system", "user", "assistant")
_PROMPT_KEYS = ("messages", "prompt")


@dataclass
class PromptRows:
    """Tokenised prompts with their messages and columns; ``where[i]`` is ``file:line`` of row i."""

    ids: List[List[int]] = field(default_factory=list)
    messages: List[List[dict]] = field(default_factory=list)
    columns: List[dict] = field(default_factory=list)
    where: List[str] = field(default_factory=list)
    description: str = ""

    def __len__(self) -> int:
        return len(self.ids)


def prompt_messages(row) -> List[dict]:
    """The row's prompt turns, checked (roles, string contents, ending with a user turn)."""
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    if "messages" in row:
        turns = row["messages"]
        if not isinstance(turns, list) or not turns:
            raise RowError("'messages' must be a non-empty list of prompt turns")
    elif "prompt" in row:
        turns = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    else:
        raise RowError("row has neither 'messages' nor 'prompt'")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in _ROLES or not isinstance(turn.get("content"), str):
            raise RowError(f"turn {i} needs a role ({', '.join(_ROLES)}) and a string content")
        out.append({"role": turn["role"], "content": turn["content"]})
    if out[-1]["role"] == "assistant":
        raise RowError("the prompt ends with an assistant turn: the completion is generated, leave it out")
    return out


def prompt_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_folder,
                  max_completion_length: int) -> PromptRows:
    """All usable prompts of the files, in file order; bad rows raise DataError(file, line) or are skipped."""
    template = load_template(data_cfg.template, template_folder)
    rows, counts = PromptRows(), Counts()
    limit = seq_length - max_completion_length
    for path, line_no, line in jsonl_lines(paths, *line_rules(data_cfg), counts):
        counts.rows += 1
        try:
            row = json.loads(line)
            messages = prompt_messages(row)
            ids = tokenizer.encode_with_offsets(template.render(messages, add_generation_prompt=True))[0]
        except json.JSONDecodeError as e:
            _bad(data_cfg, counts, path, line_no, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        except (RowError, TemplateError) as e:
            _bad(data_cfg, counts, path, line_no, str(e))
            continue
        if len(ids) > limit:
            if data_cfg.truncation == "error":
                raise DataError(path, line_no, f"prompt has {len(ids)} tokens; with task.max_completion_length="
                                f"{max_completion_length} it must be at most train.seq_length - that = {limit} "
                                "(raise train.seq_length, or data.truncation=drop)")
            counts.dropped += 1  # a prompt cut short is a different question: dropped, never truncated
            continue
        rows.ids.append(ids)
        rows.messages.append(messages)
        rows.columns.append({k: v for k, v in row.items() if k not in _PROMPT_KEYS})
        rows.where.append(f"{path}:{line_no}")
    if not rows.ids:
        raise DataError(",".join(paths), None, f"no usable prompts ({counts.rows} rows)")
    rows.description = (f"prompts:{','.join(paths)} ({counts.rows} rows, template {template.name}: {len(rows)} "
                        f"prompts, {counts.skipped} bad rows skipped, {counts.dropped} too long dropped)")
    return rows


def _bad(data_cfg, counts: Counts, path: str, line_no: int, reason: str) -> None:
    if data_cfg.on_error == "skip":
        counts.skipped += 1
        return
    raise DataError(path, line_no, f"{reason} (data.on_error=skip skips such rows)")


def stop_token_ids(template, tokenizer) -> List[int]:
    """Tokens that end a completion: end-of-document, and the template's end-of-turn token: the first token
    it prints after an assistant reply (found by rendering one) when that token is a special marker such as
    ``<|im_end|>``, ``<|eot_id|>``, ``</s>`` (one token spelling a bracketed string), not plain text."""
    marker = "\x00END\x00"
    text = template.render([{"role": "user", "content": "u"}, {"role": "assistant", "content": marker}])
    after = text[text.index(marker) + len(marker):] if marker in text else ""
    ids = {tokenizer.eod}
    suffix, spans = tokenizer.encode_with_offsets(after) if after else ([], [])
    if suffix:
        piece = after[spans[0][0]:spans[0][1]]
        if len(piece) > 2 and piece[0] in "<[" and piece[-1] in ">]":
            ids.add(suffix[0])
    return sorted(ids)
