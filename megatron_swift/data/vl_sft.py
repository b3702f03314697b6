"""Vision-language SFT rows (LLaVA style): conversations whose text says where each image goes.

A row is an SFT row plus ``"images": ["img/001.jpg", ...]`` (paths relative to the JSONL file's folder), one
per ``<image>`` tag in its messages, in order. The conversation is rendered and masked exactly as data/sft.py
does; then every tag becomes T = ``image_seq_length`` copies of the model's image token id, the positions
where the model puts the image's T features (HF's convention: pre-expanded ids). Image positions carry no loss
(loss_mask 0) and are never a target. A tokenizer that has the tag as one special token (an HF LLaVA folder)
encodes the whole text and each tag's id is repeated T times, exactly what transformers' LlavaProcessor gives;
other tokenizers (byte, SentencePiece without the tag) encode the text between tags piece by piece. A row
without images encodes exactly as an SFT row.

Image files are checked while the files are read (bad rows name file and line, or are skipped with
data.on_error=skip); pixels are made only when a row is fetched. A truncation (data.truncation=truncate)
that would cut into an image drops the row; images after the cut leave with their tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_swift.data.conversations import RowError, to_messages
from megatron_swift.data.errors import DataError
from megatron_swift.data.images import VisionData, image_path, image_problem, open_image, upright_size
from megatron_swift.data.sft import Counts, SFTRows, _Samples, loss_targets, read_files, read_samples, row_encoder

_VISION_KEYS = ("images", "image_index")


@dataclass
class VLSamples(_Samples):
    """SFT samples plus, per sample, the first position of each image, its positions, and the image files, in
    order."""

    starts: List[np.ndarray] = field(default_factory=list)
    images: List[tuple] = field(default_factory=list)
    lengths: List[np.ndarray] = field(default_factory=list)


class ImageTokens:
    """Text -> (ids, offsets, image starts): the tokenizer's ids with image tag k as n_k image token ids (between
    the model's wrap tokens, if it has them)."""

    def __init__(self, tokenizer, vision: VisionData):
        self.tokenizer, self.vision = tokenizer, vision
        tag_ids = tokenizer.encode_with_offsets(vision.image_token)[0]
        if len(tag_ids) == 1 and tag_ids[0] != vision.image_token_id:
            raise DataError(getattr(tokenizer, "folder", "data.tokenizer"), None,
                            f"the tokenizer encodes {vision.image_token} as token id {tag_ids[0]} but the model's "
                            f"image token id is {vision.image_token_id}")
        self.wrap = [] if vision.wrap is None else [_one_token(tokenizer, t) for t in vision.wrap]
        # the tag is one special token: encode the text as it is (tokens around each image: piece by piece)
        self.whole = len(tag_ids) == 1 and not self.wrap
        self._tag = re.compile(re.escape(vision.image_token))

    def __call__(self, text: str, lengths: Sequence[int]):
        """``lengths``: the positions of each image, in order."""
        ids, offsets, starts = self._whole(text, lengths) if self.whole else self._pieces(text, lengths)
        return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2), starts

    def _whole(self, text: str, lengths: Sequence[int]):
        """Encode the text as it is and repeat image token k n_k times (= expanding the tags first)."""
        image_id = self.vision.image_token_id
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        ids, offsets = np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        at = np.flatnonzero(ids == image_id)
        tags = len(self._tag.findall(text))
        if len(at) != tags:  # e.g. a template that prints the token itself
            raise RowError(f"the rendered conversation has {tags} {self.vision.image_token} tags but the tokenizer "
                           f"finds {len(at)} image tokens (id {image_id}) in it")
        repeat = np.ones(len(ids), dtype=np.int64)
        repeat[at] = lengths
        before = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64) - 1)[:-1]])
        return np.repeat(ids, repeat), np.repeat(offsets, repeat, axis=0), at + before

    def _pieces(self, text: str, lengths: Sequence[int]):
        """Encode the text between tags piece by piece (offsets into the whole text), n_k image ids for tag k
        (after the opening and before the closing wrap token)."""
        image_id = self.vision.image_token_id
        ids: List[int] = []
        offsets: List[tuple] = []
        starts: List[int] = []
        pos = 0
        for k, match in enumerate([*self._tag.finditer(text), None]):
            end = match.start() if match else len(text)
            if end > pos:
                piece_ids, piece_offsets = self.tokenizer.encode_with_offsets(text[pos:end])
                ids += piece_ids
                offsets += [(a + pos, b + pos) for a, b in piece_offsets]
            if match:
                n = lengths[k]
                wrapped = [self.wrap[0], *[image_id] * n, self.wrap[1]] if self.wrap else [image_id] * n
                starts.append(len(ids) + bool(self.wrap))
                ids += wrapped
                offsets += [match.span()] * len(wrapped)
                pos = match.end()
        return ids, offsets, np.asarray(starts, dtype=np.int64)


def _one_token(tokenizer, text: str) -> int:
    ids = tokenizer.encode_with_offsets(text)[0]
    if len(ids) != 1:
        raise DataError(getattr(tokenizer, "folder", "data.tokenizer"), None,
                        f"the tokenizer does not have {text} as one token (the model writes it around each image)")
    return ids[0]


class RowImages:
    """The image files of a row, resolved against its JSONL file and checked once each."""

    def __init__(self, vision: VisionData):
        self.vision = vision
        self._problems: Dict[str, Optional[str]] = {}
        self._lengths: Dict[str, int] = {}

    def files(self, row: dict, jsonl_path: str, tags: int) -> tuple:
        """(image files, the positions each takes) of the row."""
        names = row.get("images")
        names = [] if names is None else names  # a row without images is a text-only conversation
        if not isinstance(names, list):
            raise RowError("'images' must be a list of image file paths")
        if tags != len(names):
            raise RowError(f"{tags} {self.vision.image_token} tag{'s' * (tags != 1)} but {len(names)} "
                           f"image{'s' * (len(names) != 1)} ('images' needs one file per tag, in order)")
        files = tuple(image_path(name, jsonl_path) for name in names)
        for name, file in zip(names, files):
            if file not in self._problems:
                self._problems[file] = image_problem(file)
            if self._problems[file]:
                raise RowError(f"image '{name}': {self._problems[file]}")
            if file not in self._lengths:  # the model's processor decides, from the upright size (header only)
                self._lengths[file] = self.vision.positions(upright_size(file))
        return files, [self._lengths[file] for file in files]


def vl_line_encoder(data_cfg, template, tokenizer, seq_length: int, counts: Counts, vision: VisionData):
    """``encode(line, path, line_no)`` -> (ids, targets, image starts, image files) of one row, or None
    (skipped or dropped; see sft.row_encoder)."""
    tokens, images, wrap = ImageTokens(tokenizer, vision), RowImages(vision), int(vision.wrap is not None)
    where = {}  # the JSONL file of the line being encoded: image paths are relative to it

    def encode_row(row):
        messages = to_messages(row, data_cfg.format)
        text, spans = template.spans(messages)
        files, lengths = images.files(row, where["path"], text.count(vision.image_token))
        ids, offsets, starts = tokens(text, lengths)
        lengths = np.asarray(lengths, dtype=np.int64)
        targets = loss_targets(messages, spans, offsets, data_cfg.loss_on)
        targets[_image_positions(starts - wrap, lengths + 2 * wrap, len(ids))] = False
        return [(ids, targets, starts, files, lengths)]

    def cut(side, length: int):
        ids, targets, starts, files, lengths = side
        first, end = starts - wrap, starts + lengths + wrap  # an image's span, its wrap tokens included
        if any(a < length < b for a, b in zip(first.tolist(), end.tolist())):
            return None  # an image cut in two cannot be fed to the model: drop the row
        keep = end <= length
        return ids[:length], targets[:length], starts[keep], files[:int(keep.sum())], lengths[keep]

    encode_sides = row_encoder(data_cfg, seq_length, counts, encode_row, "conversation", cut)

    def encode_line(line: str, path: str, line_no: int):
        where["path"] = path
        sides = encode_sides(line, path, line_no)
        return None if sides is None else sides[0]

    return encode_line


def _image_positions(starts: np.ndarray, lengths: np.ndarray, length: int) -> np.ndarray:
    """Boolean mask of the positions that hold image tokens."""
    mask = np.zeros(length, dtype=bool)
    for s, n in zip(starts.tolist(), lengths.tolist()):
        mask[s:s + n] = True
    return mask


class VLRows(SFTRows):
    """SFT rows (one sample, or packed samples) plus their images ([m, 3, H, W], made when fetched) and, per
    position, the local image feature index k * T + j (-1 for text)."""

    def __init__(self, samples: VLSamples, seq_length: int, pad_id: int, packing: bool, description: str,
                 vision: VisionData):
        super().__init__(samples, seq_length, pad_id, packing, description)
        self.vision = vision
        self._empty: Optional[torch.Tensor] = None

    @property
    def images_per_row(self) -> float:
        """Mean images per row (the FLOPs of a step count the encoder per image)."""
        return sum(len(files) for files in self.samples.images) / max(1, len(self.rows))

    def __getitem__(self, index: int) -> dict:
        row = super().__getitem__(index)
        image_index = np.full(self.seq_length, -1, dtype=np.int64)
        files: List[str] = []
        at = features = 0
        for i in self.rows[index]:  # the samples in the order fill_row placed them
            samples = self.samples
            for s, n, file in zip(samples.starts[i].tolist(), samples.lengths[i].tolist(), samples.images[i]):
                image_index[at + s:at + s + n] = features + np.arange(n)
                features += n
                files.append(file)
            at += len(self.samples.ids[i])
        row["loss_mask"][image_index >= 0] = 0  # an image position predicts nothing
        row["image_index"] = image_index
        row["images"] = self._pixels(files)
        return row

    def _pixels(self, files: List[str]) -> torch.Tensor:
        """[images (or all their tiles), 3, H, W]."""
        if not files:
            return self._no_images()
        pixels = [self._image(file) for file in files]
        return torch.cat(pixels) if pixels[0].dim() == 4 else torch.stack(pixels)

    def _image(self, file: str) -> torch.Tensor:
        try:
            image = open_image(file)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(file, None, f"image cannot be read any more ({e}); it could when the data was read")
        return self.vision.processor(image).to(torch.float32)

    def _no_images(self) -> torch.Tensor:
        """[0, 3, H, W]: rows without images still give a tensor the model can concatenate."""
        if self._empty is None:
            from PIL import Image

            shape = self.vision.processor(Image.new("RGB", (64, 64))).shape[-3:]
            self._empty = torch.zeros((0, *shape), dtype=torch.float32)
        return self._empty

    def collate(self, items: List[dict]):
        batch = self.collate_items([{k: v for k, v in item.items() if k not in _VISION_KEYS} for item in items],
                                   self.packing)
        before, index = 0, []
        for item in items:  # renumber: feature row j of a row is (features of earlier rows) + j of the micro-batch
            local = torch.from_numpy(item["image_index"])
            index.append(torch.where(local >= 0, local + before, local))
            before += int((local >= 0).sum())
        pixels = torch.cat([item["images"] for item in items])
        if self.vision.media_key:  # a held tower takes its own keyword (models/held_tower.py)
            batch.media = {self.vision.media_key: pixels} if len(pixels) else None
        else:
            batch.images = pixels
        batch.image_index = torch.stack(index)
        return batch


def _tokens_each(vision: VisionData) -> str:
    if vision.tiles is None:
        return f"{vision.image_seq_length} tokens each"
    return f"{vision.image_seq_length} tokens per tile, tiles by the image processor"


def read_vl(paths: Sequence[str], data_cfg, template, tokenizer, seq_length: int, vision: VisionData):
    """(VLSamples, Counts) of the files; bad rows raise DataError(file, line) or are skipped."""
    counts = Counts()
    encode_line = vl_line_encoder(data_cfg, template, tokenizer, seq_length, counts, vision)
    return read_samples(paths, data_cfg, encode_line, VLSamples(), counts), counts


def vl_sft_source(paths: Sequence[str], data_cfg, tokenizer, seq_length: int, template_spec: Optional[str],
                  template_folder: Optional[str], vision: VisionData) -> VLRows:
    """VLRows over conversation-with-images files, with what was skipped, truncated and dropped in its
    description."""
    from megatron_swift.data.templates import load_template

    template = load_template(template_spec, template_folder)
    samples, counts = read_files(
        paths, data_cfg, lambda some: read_vl(some, data_cfg, template, tokenizer, seq_length, vision))
    images = sum(len(files) for files in samples.images)
    description = (f"vl_sft:{','.join(paths)} ({counts.rows} rows, template {template.name}: {len(samples.ids)} "
                   f"samples with {images} images ({_tokens_each(vision)}), {counts.skipped} bad "
                   f"rows skipped, {counts.truncated} truncated, {counts.dropped} dropped)")
    return VLRows(samples, seq_length, tokenizer.pad, data_cfg.packing, description, vision)
