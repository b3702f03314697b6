"""Preference data: pairs (DPO/IPO, reward models) and labelled single completions (KTO), two rows per item.

Accepted rows (JSONL):

- pairs: ``{"messages": [..., {"role": "assistant", "content": chosen}], "rejected_response": "..."}`` or
  ``{"prompt": "..." | [messages], "chosen": "..." | [messages], "rejected": "..." | [messages]}``;
  an optional number ``"margin"`` is the reward model's required margin for that pair.
- KTO: ``{"prompt": ..., "completion": "..." | [messages], "label": true|false}`` or
  ``{"messages": [..., {"role": "assistant", ...}], "label": true|false}``.

Every side is rendered with the chat template as prompt + one assistant turn;
only the completion (that turn and its end-of-turn token) carries loss, so a
summed log-probability is over completion tokens. One dataset item is two
rows and a micro-batch of ``m`` items is ``2m`` rows, the first rows of the
items then their second rows, so pipeline and data parallelism never split an
item. For a pair the rows are (chosen, rejected). For KTO they are (the
example, its KL row): the example's prompt with the completion of the next
example in the files (fixed, as in TRL's KL dataset), from which the batch
estimate of KL(policy || reference) is made.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from megatron_swift.data.conversations import RowError, to_messages
from megatron_swift.data.errors import DataError
from megatron_swift.data.files import jsonl_lines, line_rules
from megatron_swift.data.sampler import Batch
from megatron_swift.data.sft import Counts, SFTRows, _Samples, encode, row_encoder
from megatron_swift.data.templates import load_template


def _completion(value, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return value[-1].get("content")
    raise RowError(f"'{key}' must be a string or a message list ending with an assistant turn")


def _prompt(value) -> List[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value, "loss": None}]
    if isinstance(value, list):
        return [dict(m, loss=None) for m in value if isinstance(m, dict)]
    raise RowError("'prompt' must be a string or a message list")


def _split_messages(row: dict, needs: str) -> Tuple[List[dict], str]:
    messages = to_messages({"messages": row["messages"]}, "messages")
    if messages[-1]["role"] != "assistant":
        raise RowError(f"'messages' must end with the {needs} assistant turn")
    return messages[:-1], messages[-1]["content"]


def _check_texts(prompt: List[dict], **texts) -> None:
    if not prompt:
        raise RowError("the prompt is empty")
    for name, text in texts.items():
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"the {name} completion is empty")


def to_pair(row) -> Tuple[List[dict], str, str]:
    """(prompt messages, chosen text, rejected text), checked."""
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    if "messages" in row:
        if "rejected_response" not in row:
            raise RowError("row has 'messages' but no 'rejected_response'")
        prompt, chosen = _split_messages(row, "chosen")
        rejected = _completion(row["rejected_response"], "rejected_response")
    elif {"prompt", "chosen", "rejected"} <= set(row):
        prompt = _prompt(row["prompt"])
        chosen, rejected = _completion(row["chosen"], "chosen"), _completion(row["rejected"], "rejected")
    else:
        missing = "rejected" if "chosen" in row else "chosen/rejected"
        raise RowError(f"row needs 'messages' + 'rejected_response', or 'prompt', 'chosen' and 'rejected' "
                       f"(missing {missing})")
    _check_texts(prompt, chosen=chosen, rejected=rejected)
    if chosen == rejected:
        raise RowError("chosen and rejected completions are identical")
    return prompt, chosen, rejected


def pair_margin(row: dict) -> float:
    """The row's optional reward margin (0 when absent)."""
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise RowError(f"'margin' must be a number, not {margin!r}")
    return float(margin)


def to_example(row) -> Tuple[List[dict], str, bool]:
    """(prompt messages, completion text, desirable) of a KTO row, checked."""
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    if "label" not in row:
        raise RowError("row has no 'label' (true: desirable completion, false: undesirable)")
    if not isinstance(row["label"], bool):
        raise RowError(f"'label' must be true or false, not {row['label']!r}")
    if "messages" in row:
        prompt, completion = _split_messages(row, "labelled")
    elif {"prompt", "completion"} <= set(row):
        prompt, completion = _prompt(row["prompt"]), _completion(row["completion"], "completion")
    else:
        raise RowError("row needs 'prompt' and 'completion', or 'messages' ending with the assistant turn")
    _check_texts(prompt, labelled=completion)
    return prompt, completion, row["label"]


class PairedRows(torch.utils.data.Dataset):
    """Items of two rows of ``seq_length`` positions each, plus per-item values that become Batch fields."""

    def __init__(self, first: _Samples, second: _Samples, seq_length: int, pad_id: int, description: str,
                 values: Dict[str, np.ndarray]):
        self.first = SFTRows(first, seq_length, pad_id, False, "")
        self.second = SFTRows(second, seq_length, pad_id, False, "")
        self.values = values
        self.description = description

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, index: int) -> Tuple[dict, dict, dict]:
        return self.first[index], self.second[index], {k: v[index] for k, v in self.values.items()}

    @staticmethod
    def collate(items: List[Tuple[dict, dict, dict]]) -> Batch:
        """2m rows: the m first rows, then the m second rows in the same order."""
        batch = SFTRows.collate_items([a for a, _, _ in items] + [b for _, b, _ in items], packing=False)
        for name in items[0][2]:
            setattr(batch, name, torch.as_tensor(np.stack([v[name] for _, _, v in items])))
        return batch


def _side(prompt: List[dict], completion: str, template, tokenizer):
    return encode(prompt + [{"role": "assistant", "content": completion, "loss": None}], template, tokenizer,
                  "last_assistant")


def _summary(kind: str, paths, counts: Counts, template, items: int) -> str:
    return (f"{kind}:{','.join(paths)} ({counts.rows} rows, template {template.name}: {items} items, "
            f"{counts.skipped} bad rows skipped, {counts.truncated} truncated, {counts.dropped} dropped)")


def _encoded_rows(paths: Sequence[str], data_cfg, seq_length: int, counts: Counts, encode_row, subject: str,
                  extras: list) -> list:
    """The encoded sides of every kept row of the files; ``encode_row`` may append per-row values to
    ``extras``, which are trimmed again for rows skipped or dropped (see sft.row_encoder)."""
    encode_line = row_encoder(data_cfg, seq_length, counts, encode_row, subject)
    rows = []
    # Lines that are not UTF-8 or over data.max_line_bytes are bad rows too (counted there when skipped).
    for path, line_no, line in jsonl_lines(paths, *line_rules(data_cfg), counts):
        counts.rows += 1
        before = len(extras)
        sides = encode_line(line, path, line_no)
        if sides is None:
            del extras[before:]
        else:
            rows.append(sides)
    return rows


def _samples(sides) -> _Samples:
    samples = _Samples()
    for ids, targets in sides:
        samples.ids.append(ids)
        samples.targets.append(targets)
    return samples


def preference_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_folder,
                      cfg=None) -> PairedRows:
    """Encoded pairs (chosen, rejected) of all files, with each pair's margin; bad rows raise
    DataError(file, line) or are skipped (data.on_error=skip)."""
    template = load_template(data_cfg.template, template_folder)
    margins, counts = [], Counts()

    def encode_pair(row):
        prompt, good, bad = to_pair(row)
        margins.append(pair_margin(row))
        return [_side(prompt, good, template, tokenizer), _side(prompt, bad, template, tokenizer)]

    pairs = _encoded_rows(paths, data_cfg, seq_length, counts, encode_pair, "pair", margins)
    if not pairs:
        raise DataError(",".join(paths), None, f"no usable preference pairs ({counts.rows} rows)")
    return PairedRows(_samples(p[0] for p in pairs), _samples(p[1] for p in pairs), seq_length, tokenizer.pad,
                      _summary("preference", paths, counts, template, len(pairs)),
                      {"margin": np.asarray(margins, dtype=np.float32)})


def kto_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_folder, cfg=None) -> PairedRows:
    """Encoded KTO examples with their KL rows and labels; bad rows raise DataError(file, line) or are skipped."""
    template = load_template(data_cfg.template, template_folder)
    kept, counts = [], Counts()

    def encode_example(row):
        prompt, completion, label = to_example(row)
        kept.append((prompt, completion, label))
        return [_side(prompt, completion, template, tokenizer)]

    examples = _encoded_rows(paths, data_cfg, seq_length, counts, encode_example, "example", kept)
    if len(kept) < 2:
        raise DataError(",".join(paths), None, f"KTO needs at least 2 usable examples ({counts.rows} rows, "
                        f"{len(kept)} usable): the KL estimate pairs prompts with other examples' completions")
    kl = []
    for i, (prompt, _, _) in enumerate(kept):
        ids, targets = _side(prompt, kept[(i + 1) % len(kept)][1], template, tokenizer)
        kl.append((ids[:seq_length], targets[:seq_length]))  # only an estimate: a long one is cut
    labels = np.asarray([label for _, _, label in kept])
    description = (_summary("kto", paths, counts, template, len(kept))
                   + f", {int(labels.sum())} desirable / {int((~labels).sum())} undesirable")
    return PairedRows(_samples(e[0] for e in examples), _samples(kl), seq_length, tokenizer.pad, description,
                      {"desirable": labels})
