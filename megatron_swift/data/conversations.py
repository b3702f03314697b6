"""Rows of SFT files as one list of messages: ``[{"role", "content", "loss"}]``.

Accepted row shapes (``data.format=auto`` picks by the keys present):

- messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "loss": false?}]}``
- sharegpt: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}], "system": "..."?}``
- alpaca:   ``{"instruction": "...", "input": "..."?, "output": "...", "system": "..."?}``
"""
from __future__ import annotations

from typing import List, Optional

FORMATS = ("auto", "messages", "sharegpt", "alpaca")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """A row that is not a usable conversation; the caller adds file and line."""


def detect_format(row: dict) -> str:
    for name, key in (("messages", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction")):
        if key in row:
            return name
    raise RowError("row has none of 'messages', 'conversations' or 'instruction' (see data.format)")


def to_messages(row, fmt: str = "auto") -> List[dict]:
    """The row's conversation, checked: known roles, string contents, at least one non-empty assistant turn."""
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    fmt = detect_format(row) if fmt == "auto" else fmt
    messages = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca}[fmt](row)
    _check(messages)
    return messages


def _message(role: str, content, loss: Optional[bool] = None) -> dict:
    return {"role": role, "content": content, "loss": loss}


def _messages(row: dict) -> List[dict]:
    items = row.get("messages")
    if not isinstance(items, list):
        raise RowError("'messages' is not a list")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"message {i} needs 'role' and 'content'")
        loss = m.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise RowError(f"message {i}: 'loss' must be true or false")
        out.append(_message(m["role"], m["content"], loss))
    return out


def _sharegpt(row: dict) -> List[dict]:
    items = row.get("conversations")
    if not isinstance(items, list):
        raise RowError("'conversations' is not a list")
    out = [_message("system", row["system"])] if row.get("system") else []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or m.get("from") not in _SHAREGPT_ROLES or "value" not in m:
            raise RowError(f"conversation turn {i} needs 'from' (one of {', '.join(_SHAREGPT_ROLES)}) and 'value'")
        out.append(_message(_SHAREGPT_ROLES[m["from"]], m["value"], m.get("loss")))
    return out


def _alpaca(row: dict) -> List[dict]:
    if not isinstance(row.get("instruction"), str) or "output" not in row:
        raise RowError("alpaca rows need string 'instruction' and 'output'")
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    out = [_message("system", row["system"])] if row.get("system") else []
    return out + [_message("user", prompt), _message("assistant", row["output"])]


def _check(messages: List[dict]) -> None:
    if not messages:
        raise RowError("conversation is empty")
    for i, m in enumerate(messages):
        if m["role"] not in _ROLES:
            raise RowError(f"message {i} has role '{m['role']}'; expected one of {', '.join(_ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError(f"message {i} content is not a string")
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise RowError("conversation has no assistant turn")
    if any(not m["content"].strip() for m in assistants):
        raise RowError("an assistant turn is empty")
