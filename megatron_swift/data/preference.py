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

With a vision-language model (``vision``, from the model) a row may add ``"images": ["a.jpg", ...]``, one per
``<image>`` tag in its prompt, as data.vl_sft rows do: both rows of the item (chosen and rejected; a KTO
example and its KL row) see the same images; the rows are vl_sft's (image tokens, M-RoPE positions, pixels or
a held tower's media), and a truncation that would cut an image drops the item.
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
from megatron_swift.data.vl_sft import VLRows, VLSamples, VLSides, no_videos


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

    def collate(self, items: List[Tuple[dict, dict, dict]]) -> Batch:
        """2m rows: the m first rows, then the m second rows in the same order."""
        return _with_values(SFTRows.collate_items([a for a, _, _ in items] + [b for _, b, _ in items],
                                                  packing=False), items)


class PairedVLRows(PairedRows):
    """PairedRows whose rows carry images (data.vl_sft's rows): a micro-batch's images, media and image_index
    are numbered over its 2m rows in their order (first rows, then second rows)."""

    def __init__(self, first: VLSamples, second: VLSamples, seq_length: int, pad_id: int, description: str,
                 values: Dict[str, np.ndarray], vision):
        self.first = VLRows(first, seq_length, pad_id, False, "", vision)
        self.second = VLRows(second, seq_length, pad_id, False, "", vision)
        self.values = values
        self.description = description

    @property
    def images_per_row(self) -> float:
        return (self.first.images_per_row + self.second.images_per_row) / 2

    @property
    def image_tokens_per_row(self) -> float:
        return (self.first.image_tokens_per_row + self.second.image_tokens_per_row) / 2

    def collate(self, items: List[Tuple[dict, dict, dict]]) -> Batch:
        return _with_values(self.first.collate([a for a, _, _ in items] + [b for _, b, _ in items]), items)


def _with_values(batch: Batch, items: List[Tuple[dict, dict, dict]]) -> Batch:
    """``batch`` with each per-item value (margin, desirable) as a Batch field."""
    for name in items[0][2]:
        setattr(batch, name, torch.as_tensor(np.stack([v[name] for _, _, v in items])))
    return batch


class _Sides:
    """prompt + one assistant turn -> a side: (ids, targets) of the rendering, or with a vision-language model
    (``vision``) vl_sft's side with the row's images."""

    def __init__(self, template, tokenizer, vision=None):
        self.template, self.tokenizer = template, tokenizer
        self.vl = None if vision is None else VLSides(template, tokenizer, vision)
        self.path = None  # the JSONL file of the row being encoded: image paths are relative to it

    def __call__(self, prompt: List[dict], completion: str, row: dict):
        messages = prompt + [{"role": "assistant", "content": completion, "loss": None}]
        if self.vl is None:
            if isinstance(row, dict) and row.get("images"):
                raise RowError("'images': this model has no vision tower (train a vision-language model, or "
                               "drop the images)")
            return encode(messages, self.template, self.tokenizer, "last_assistant")
        no_videos(row)
        return self.vl(messages, row, self.path, "last_assistant")

    def cut(self):
        return {} if self.vl is None else {"cut": self.vl.cut}

    def kl_row(self, side: tuple, seq_length: int) -> tuple:
        """A KTO KL row cut to ``seq_length`` (only an estimate: a long one is cut). Its images are in the prompt
        it shares with a kept example, so they fit whole."""
        if len(side[0]) <= seq_length:
            return side
        return (side[0][:seq_length], side[1][:seq_length]) if self.vl is None else self.vl.cut(side, seq_length)

    def samples(self, sides) -> _Samples:
        samples = _Samples() if self.vl is None else VLSamples()
        for side in sides:
            samples.append(side)
        return samples

    def rows(self, first, second, seq_length: int, pad_id: int, description: str, values) -> PairedRows:
        if self.vl is None:
            return PairedRows(self.samples(first), self.samples(second), seq_length, pad_id, description, values)
        return PairedVLRows(self.samples(first), self.samples(second), seq_length, pad_id, description, values,
                            self.vl.vision)


def _summary(kind: str, paths, counts: Counts, template, items: int) -> str:
    return (f"{kind}:{','.join(paths)} ({counts.rows} rows, template {template.name}: {items} items, "
            f"{counts.skipped} bad rows skipped, {counts.truncated} truncated, {counts.dropped} dropped)")


def _encoded_rows(paths: Sequence[str], data_cfg, seq_length: int, counts: Counts, encode_row, subject: str,
                  extras: list, encoder: _Sides) -> list:
    """The encoded sides of every kept row of the files; ``encode_row`` may append per-row values to
    ``extras``, which are trimmed again for rows skipped or dropped (see sft.row_encoder)."""
    encode_line = row_encoder(data_cfg, seq_length, counts, encode_row, subject, **encoder.cut())
    rows = []
    # Lines that are not UTF-8 or over data.max_line_bytes are bad rows too (counted there when skipped).
    for path, line_no, line in jsonl_lines(paths, *line_rules(data_cfg), counts):
        counts.rows += 1
        encoder.path = path
        before = len(extras)
        sides = encode_line(line, path, line_no)
        if sides is None:
            del extras[before:]
        else:
            rows.append(sides)
    return rows


def preference_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_folder,
                      cfg=None, vision=None) -> PairedRows:
    """Encoded pairs (chosen, rejected) of all files, with each pair's margin; bad rows raise
    DataError(file, line) or are skipped (data.on_error=skip). ``vision``: a VLM's (rows may carry images)."""
    template = load_template(data_cfg.template, template_folder)
    margins, counts = [], Counts()
    sides = _Sides(template, tokenizer, vision)

    def encode_pair(row):
        prompt, good, bad = to_pair(row)
        margins.append(pair_margin(row))
        return [sides(prompt, good, row), sides(prompt, bad, row)]

    pairs = _encoded_rows(paths, data_cfg, seq_length, counts, encode_pair, "pair", margins, sides)
    if not pairs:
        raise DataError(",".join(paths), None, f"no usable preference pairs ({counts.rows} rows)")
    return sides.rows([p[0] for p in pairs], [p[1] for p in pairs], seq_length, tokenizer.pad,
                      _summary("preference", paths, counts, template, len(pairs)),
                      {"margin": np.asarray(margins, dtype=np.float32)})


def kto_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_folder, cfg=None,
               vision=None) -> PairedRows:
    """Encoded KTO examples with their KL rows and labels; bad rows raise DataError(file, line) or are skipped.
    ``vision``: a VLM's (an example's images go with its KL row too: they belong to its prompt)."""
    template = load_template(data_cfg.template, template_folder)
    kept, counts = [], Counts()
    sides = _Sides(template, tokenizer, vision)

    def encode_example(row):
        prompt, completion, label = to_example(row)
        kept.append((prompt, completion, label, row, sides.path))
        return [sides(prompt, completion, row)]

    examples = _encoded_rows(paths, data_cfg, seq_length, counts, encode_example, "example", kept, sides)
    if len(kept) < 2:
        raise DataError(",".join(paths), None, f"KTO needs at least 2 usable examples ({counts.rows} rows, "
                        f"{len(kept)} usable): the KL estimate pairs prompts with other examples' completions")
    kl = []
    for i, (prompt, _, _, row, path) in enumerate(kept):
        sides.path = path
        kl.append(sides.kl_row(sides(prompt, kept[(i + 1) % len(kept)][1], row), seq_length))
    labels = np.asarray([label for _, _, label, _, _ in kept])
    description = (_summary("kto", paths, counts, template, len(kept))
                   + f", {int(labels.sum())} desirable / {int((~labels).sum())} undesirable")
    return sides.rows([e[0] for e in examples], kl, seq_length, tokenizer.pad, description, {"desirable": labels})
