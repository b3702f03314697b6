"""Preference pairs for DPO/IPO: a prompt, a chosen and a rejected completion, kept together.

Accepted rows (JSONL):

- ``{"messages": [..., {"role": "assistant", "content": chosen}], "rejected_response": "..."}``
- ``{"prompt": "..." | [messages], "chosen": "..." | [messages], "rejected": "..." | [messages]}``

Both sides are rendered with the chat template as prompt + one assistant
turn; only the completion (that assistant turn and its end-of-turn token)
carries loss, so the summed log-probability is over completion tokens.
One dataset item is one pair; a micro-batch of ``m`` pairs is ``2m`` rows,
chosen rows first, so pipeline and data parallelism never split a pair.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from megatron_swift.data.conversations import RowError, to_messages
from megatron_swift.data.errors import DataError
from megatron_swift.data.sampler import Batch
from megatron_swift.data.files import jsonl_lines
from megatron_swift.data.sft import Counts, SFTRows, _Samples, encode, row_encoder
from megatron_swift.data.templates import load_template


def _completion(value, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return value[-1].get("content")
    raise RowError(f"'{key}' must be a string or a message list ending with an assistant turn")


def to_pair(row) -> Tuple[List[dict], str, str]:
    """(prompt messages, chosen text, rejected text), checked."""
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    if "messages" in row:
        messages = to_messages({"messages": row["messages"]}, "messages")
        if messages[-1]["role"] != "assistant":
            raise RowError("'messages' must end with the chosen assistant turn")
        if "rejected_response" not in row:
            raise RowError("row has 'messages' but no 'rejected_response'")
        prompt, chosen, rejected = messages[:-1], messages[-1]["content"], _completion(row["rejected_response"],
                                                                                       "rejected_response")
    elif {"prompt", "chosen", "rejected"} <= set(row):
        p = row["prompt"]
        prompt = [{"role": "user", "content": p, "loss": None}] if isinstance(p, str) else \
            [dict(m, loss=None) for m in p if isinstance(m, dict)]
        chosen, rejected = _completion(row["chosen"], "chosen"), _completion(row["rejected"], "rejected")
    else:
        missing = "rejected" if "chosen" in row else "chosen/rejected"
        raise RowError(f"row needs 'messages' + 'rejected_response', or 'prompt', 'chosen' and 'rejected' "
                       f"(missing {missing})")
    if not prompt:
        raise RowError("the prompt is empty")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"the {name} completion is empty")
    if chosen == rejected:
        raise RowError("chosen and rejected completions are identical")
    return prompt, chosen, rejected


class PreferencePairs(torch.utils.data.Dataset):
    """Pairs of rows (chosen, rejected) of ``seq_length`` positions each."""

    def __init__(self, chosen: _Samples, rejected: _Samples, seq_length: int, pad_id: int, description: str):
        self.chosen = SFTRows(chosen, seq_length, pad_id, False, "")
        self.rejected = SFTRows(rejected, seq_length, pad_id, False, "")
        self.description = description

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, index: int) -> Tuple[dict, dict]:
        return self.chosen[index], self.rejected[index]

    @staticmethod
    def collate(pairs: List[Tuple[dict, dict]]) -> Batch:
        """2m rows: the m chosen rows, then the m rejected rows in the same order."""
        return SFTRows.collate_items([c for c, _ in pairs] + [r for _, r in pairs], packing=False)


def preference_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_folder) -> PreferencePairs:
    """Encoded pairs of all files; bad rows raise DataError(file, line) or are skipped (data.on_error=skip)."""
    template = load_template(data_cfg.template, template_folder)
    chosen, rejected, counts = _Samples(), _Samples(), Counts()

    def encode_pair(row):
        prompt, *completions = to_pair(row)
        return [encode(prompt + [{"role": "assistant", "content": text, "loss": None}], template, tokenizer,
                       "last_assistant") for text in completions]

    encode_line = row_encoder(data_cfg, seq_length, counts, encode_pair, "pair")
    for path, line_no, line in jsonl_lines(paths):
        counts.rows += 1
        pair = encode_line(line, path, line_no)
        if pair is not None:
            for samples, (ids, targets) in zip((chosen, rejected), pair):
                samples.ids.append(ids)
                samples.targets.append(targets)
    if not chosen.ids:
        raise DataError(",".join(paths), None, f"no usable preference pairs ({counts.rows} rows)")
    description = (f"preference:{','.join(paths)} ({counts.rows} rows, template {template.name}: {len(chosen.ids)} "
                   f"pairs, {counts.skipped} bad rows skipped, {counts.truncated} truncated, {counts.dropped} "
                   "dropped)")
    return PreferencePairs(chosen, rejected, seq_length, tokenizer.pad, description)
