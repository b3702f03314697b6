"""An HF export of a run with model.new_tokens: config.json's vocabulary and the tokenizer files carry them.

The tokens are added to the exported ``tokenizer.json`` the way the run added them (models/new_tokens.py:
special, never split, not normalised), which gives them the ids the run used, checked here; transformers'
``tokenizer_config.json`` lists them in ``added_tokens_decoder`` as special. Written with ``tokenizers`` and
JSON only.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional


def write_new_tokens(folder: str, tokens: List[str], vocab_size: int, rows: Optional[List[int]] = None) -> None:
    """``rows``: the ids the run gave the tokens it added (the checkpoint's new_token_rows), checked."""
    if not tokens:
        return
    _grow_config(os.path.join(folder, "config.json"), vocab_size)
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return  # byte / SentencePiece runs: no HF tokenizer file to carry them
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(path)
    fresh = [t for t in tokens if tokenizer.token_to_id(t) is None]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    ids = {t: tokenizer.token_to_id(t) for t in tokens}
    past = {t: i for t, i in ids.items() if i >= vocab_size}
    moved = rows is not None and len(rows) == len(fresh) and [ids[t] for t in fresh] != list(rows)
    if past or moved:
        raise ValueError(f"{path}: the new tokens get ids {ids} here, but the model's rows for them are "
                         f"{rows if moved else f'below {vocab_size}'}; is this the tokenizer the run used "
                         "(data.tokenizer)? Pass its folder as --base")
    tokenizer.save(path)
    config_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        decoder = config.setdefault("added_tokens_decoder", {})
        for token, i in ids.items():
            decoder.setdefault(str(i), dict(content=token, lstrip=False, normalized=False, rstrip=False,
                                            single_word=False, special=True))
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)


def _grow_config(path: str, vocab_size: int) -> None:
    """config.json's vocab_size (top level, or a composite model's text_config) raised to the grown one."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    target = config if "vocab_size" in config or "text_config" not in config else config["text_config"]
    if target.get("vocab_size", 0) < vocab_size:
        target["vocab_size"] = vocab_size
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
