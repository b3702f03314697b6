"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, ``eod``.

``byte`` needs no files (UTF-8 bytes plus three specials) and is what the
bundled demo uses; a folder or ``tokenizer.json`` loads an HF fast tokenizer;
a ``.model`` file loads SentencePiece.
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Tuple

from megatron_swift.data.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes 0..255, then <eod>=256, <bos>=257, <pad>=258.

    In chat-formatted text (``encode_with_offsets``) the strings ``<|endoftext|>``, ``<|bos|>`` and
    ``<|pad|>`` stand for those three specials."""

    vocab_size = 259
    eod = 256
    bos = 257
    pad = 258
    SPECIAL = {"<|endoftext|>": 256, "<|bos|>": 257, "<|pad|>": 258}
    _SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL))

    def __init__(self):
        self.vocab_size = ByteTokenizer.vocab_size
        self._added = {}  # model.new_tokens: text -> id, from 259 on

    def add_special_tokens(self, tokens: List[str]) -> List[int]:
        """Ids of ``tokens`` as new never-split tokens (numbered after the last id)."""
        for token in tokens:
            if token not in self._added and token not in self.SPECIAL:
                self._added[token] = self.vocab_size
                self.vocab_size += 1
        names = sorted({**self.SPECIAL, **self._added}, key=len, reverse=True)
        self._SPECIAL_RE = re.compile("|".join(re.escape(s) for s in names))
        return [{**self.SPECIAL, **self._added}[t] for t in tokens]

    def encode(self, text: str) -> List[int]:
        if self._added:  # added tokens are never split, in plain text too
            return self.encode_with_offsets(text)[0]
        return list(text.encode("utf-8"))

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Token ids and the (start, end) characters each token covers (specials parsed)."""
        ids, spans, pos = [], [], 0
        for match in [*self._SPECIAL_RE.finditer(text), None]:
            end = match.start() if match else len(text)
            for i in range(pos, end):
                encoded = text[i].encode("utf-8")
                ids.extend(encoded)
                spans.extend([(i, i + 1)] * len(encoded))
            if match:
                ids.append(self.SPECIAL.get(match.group(), self._added.get(match.group())))
                spans.append(match.span())
                pos = match.end()
        return ids, spans

    def decode(self, ids: List[int]) -> str:
        text = {i: t for t, i in self._added.items()}
        pieces, run = [], []
        for i in list(ids) + [None]:
            if i is None or i in text:
                pieces.append(bytes(b for b in run if b < 256).decode("utf-8", errors="replace"))
                pieces.append(text.get(i, ""))
                run = []
            else:
                run.append(i)
        return "".join(pieces)


class HFTokenizer:
    """An HF ``tokenizer.json`` read with the ``tokenizers`` library (no remote code)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        folder = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise DataError(path, None, "no tokenizer.json here (set data.tokenizer to the model's tokenizer)")
        self._tok = Tokenizer.from_file(file)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._special(folder, ("eos_token",), ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"))
        self.pad = self.eod  # padding never carries loss and is never attended to by real tokens
        self.folder = folder

    def _special(self, folder: str, keys, fallbacks) -> int:
        config = os.path.join(folder, "tokenizer_config.json")
        candidates = []
        if os.path.isfile(config):
            with open(config, encoding="utf-8") as f:
                data = json.load(f)
            for key in keys:
                value = data.get(key)
                candidates.append(value.get("content") if isinstance(value, dict) else value)
        for token in [c for c in candidates if c] + list(fallbacks):
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(f"tokenizer in {folder} has no end-of-document token (looked for eos_token, {fallbacks})")

    def add_special_tokens(self, tokens: List[str]) -> List[int]:
        """Ids of ``tokens`` added as special tokens (never split, not normalised), as transformers adds them."""
        from tokenizers import AddedToken

        self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        return [self._tok.token_to_id(t) for t in tokens]

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Token ids and the (start, end) characters each token covers (added/special tokens parsed)."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, list(encoding.offsets)

    def decode(self, ids: List[int]) -> str:
        return self._tok.decode(ids)


_BRACKETED = re.compile(r"^(<[^\s<>]+>|\[[^\s\[\]]+\])$")


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file; its EOS id ends each document."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {path} defines no EOS piece")
        self.eod = self._sp.eos_id()
        self.pad = self.eod
        # Pieces chat templates write as text: control pieces (<s>, </s>) and bracketed atomic pieces such as
        # user-defined <|im_start|> or [INST] (the Python binding cannot ask for the user-defined type).
        self._special = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)
                         if self._sp.is_control(i) or (not self._sp.is_byte(i) and not self._sp.is_unknown(i)
                                                       and _BRACKETED.match(self._sp.id_to_piece(i)))}
        self._special.pop("", None)
        self._added = {}  # model.new_tokens: text -> id after the model's pieces
        self._compile()

    def _compile(self) -> None:
        names = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(n) for n in names)) if names else None

    def add_special_tokens(self, tokens: List[str]) -> List[int]:
        """Ids of ``tokens`` as new never-split tokens, numbered after the model's pieces (the ``.model`` file
        itself is not changed: SentencePiece cannot add pieces to a trained model)."""
        for token in tokens:
            if token not in self._special:
                self._special[token] = self._added[token] = self.vocab_size
                self.vocab_size += 1
        self._compile()
        return [self._special[t] for t in tokens]

    def encode(self, text: str) -> List[int]:
        if self._added:  # added tokens are never split, in plain text too
            return self.encode_with_offsets(text)[0]
        return self._sp.encode(text)

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Token ids and the (start, end) characters each covers; special pieces in the text become their ids
        and the text between them is encoded piece by piece (as HF's SentencePiece tokenizers do)."""
        ids, spans, pos = [], [], 0
        matches = list(self._special_re.finditer(text)) if self._special_re else []
        for match in [*matches, None]:
            end = match.start() if match else len(text)
            if end > pos:
                segment = text[pos:end]
                char_of_byte = [i for i, ch in enumerate(segment) for _ in ch.encode("utf-8")] + [len(segment)]
                last = len(char_of_byte) - 1
                for piece in self._pieces(segment):
                    ids.append(piece.id)
                    spans.append((pos + char_of_byte[min(piece.begin, last)], pos + char_of_byte[min(piece.end, last)]))
            if match:
                ids.append(self._special[match.group()])
                spans.append(match.span())
                pos = match.end()
        return ids, spans

    def _pieces(self, text: str):
        """Pieces with byte offsets: out_type="proto" (sentencepiece 0.2.1+) or "immutable_proto" (older)."""
        try:
            return self._sp.encode(text, out_type="proto").pieces
        except (ValueError, TypeError, RuntimeError):
            return self._sp.encode(text, out_type="immutable_proto").pieces

    def decode(self, ids: List[int]) -> str:
        text = {i: t for t, i in self._added.items()}
        pieces, run = [], []
        for i in list(ids) + [None]:
            if i is None or i in text:
                pieces.append(self._sp.decode(run) if run else "")
                pieces.append(text.get(i, ""))
                run = []
            else:
                run.append(i)
        return "".join(pieces)


def build_tokenizer(spec: str):
    """``byte``, an HF tokenizer folder or ``tokenizer.json``, or a SentencePiece ``.model``."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    if os.path.isdir(spec) or spec.endswith(".json"):
        return HFTokenizer(spec)
    raise DataError(spec, None, "data.tokenizer expects 'byte', an HF tokenizer folder/tokenizer.json, or a .model file")
