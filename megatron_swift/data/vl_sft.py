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
from megatron_swift.data.images import VisionData, image_path, image_problem, open_image
from megatron_swift.data.sft import Counts, SFTRows, _Samples, loss_targets, read_files, read_samples, row_encoder

_VISION_KEYS = ("images", "image_index")


@dataclass
class VLSamples(_Samples):
    """SFT samples plus, per sample, the first position of each image and the image files, in order."""

    starts: List[np.ndarray] = field(default_factory=list)
    images: List[tuple] = field(default_factory=list)


class ImageTokens:
    """Text -> (ids, offsets, image starts): the tokenizer's ids with each image tag as T image token ids."""

    def __init__(self, tokenizer, vision: VisionData):
        self.tokenizer, self.vision = tokenizer, vision
        tag_ids = tokenizer.encode_with_offsets(vision.image_token)[0]
        if len(tag_ids) == 1 and tag_ids[0] != vision.image_token_id:
            raise DataError(getattr(tokenizer, "folder", "data.tokenizer"), None,
                            f"the tokenizer encodes {vision.image_token} as token id {tag_ids[0]} but the model's "
                            f"image token id is {vision.image_token_id}")
        self.whole = len(tag_ids) == 1  # the tag is one special token: encode the text as it is
        self._tag = re.compile(re.escape(vision.image_token))

    def __call__(self, text: str):
        ids, offsets, starts = self._whole(text) if self.whole else self._pieces(text)
        return np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2), starts

    def _whole(self, text: str):
        """Encode the text as it is and repeat each image token T times (= expanding the tags first)."""
        T, image_id = self.vision.image_seq_length, self.vision.image_token_id
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        ids, offsets = np.asarray(ids, dtype=np.int64), np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        at = np.flatnonzero(ids == image_id)
        tags = len(self._tag.findall(text))
        if len(at) != tags:  # e.g. a template that prints the token itself
            raise RowError(f"the rendered conversation has {tags} {self.vision.image_token} tags but the tokenizer "
                           f"finds {len(at)} image tokens (id {image_id}) in it")
        repeat = np.where(ids == image_id, T, 1)
        return np.repeat(ids, repeat), np.repeat(offsets, repeat, axis=0), at + (T - 1) * np.arange(len(at))

    def _pieces(self, text: str):
        """Encode the text between tags piece by piece (offsets into the whole text), T image ids per tag."""
        T, image_id = self.vision.image_seq_length, self.vision.image_token_id
        ids: List[int] = []
        offsets: List[tuple] = []
        starts: List[int] = []
        pos = 0
        for match in [*self._tag.finditer(text), None]:
            end = match.start() if match else len(text)
            if end > pos:
                piece_ids, piece_offsets = self.tokenizer.encode_with_offsets(text[pos:end])
                ids += piece_ids
                offsets += [(a + pos, b + pos) for a, b in piece_offsets]
            if match:
                starts.append(len(ids))
                ids += [image_id] * T
                offsets += [match.span()] * T
                pos = match.end()
        return ids, offsets, np.asarray(starts, dtype=np.int64)


class RowImages:
    """The image files of a row, resolved against its JSONL file and checked once each."""

    def __init__(self, vision: VisionData):
        self.vision = vision
        self._problems: Dict[str, Optional[str]] = {}

    def files(self, row: dict, jsonl_path: str, tags: int) -> tuple:
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
        return files


def vl_line_encoder(data_cfg, template, tokenizer, seq_length: int, counts: Counts, vision: VisionData):
    """``encode(line, path, line_no)`` -> (ids, targets, image starts, image files) of one row, or None
    (skipped or dropped; see sft.row_encoder)."""
    tokens, images, T = ImageTokens(tokenizer, vision), RowImages(vision), vision.image_seq_length
    where = {}  # the JSONL file of the line being encoded: image paths are relative to it

    def encode_row(row):
        messages = to_messages(row, data_cfg.format)
        text, spans = template.spans(messages)
        files = images.files(row, where["path"], text.count(vision.image_token))
        ids, offsets, starts = tokens(text)
        targets = loss_targets(messages, spans, offsets, data_cfg.loss_on)
        targets[_image_positions(starts, T, len(ids))] = False
        return [(ids, targets, starts, files)]

    def cut(side, length: int):
        ids, targets, starts, files = side
        if any(s < length < s + T for s in starts.tolist()):
            return None  # an image cut in two cannot be fed to the model: drop the row
        keep = starts + T <= length
        return ids[:length], targets[:length], starts[keep], files[:int(keep.sum())]

    encode_sides = row_encoder(data_cfg, seq_length, counts, encode_row, "conversation", cut)

    def encode_line(line: str, path: str, line_no: int):
        where["path"] = path
        sides = encode_sides(line, path, line_no)
        return None if sides is None else sides[0]

    return encode_line


def _image_positions(starts: np.ndarray, T: int, length: int) -> np.ndarray:
    """Boolean mask of the positions that hold image tokens."""
    mask = np.zeros(length, dtype=bool)
    for s in starts.tolist():
        mask[s:s + T] = True
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
        T = self.vision.image_seq_length
        image_index = np.full(self.seq_length, -1, dtype=np.int64)
        files: List[str] = []
        at = 0
        for i in self.rows[index]:  # the samples in the order fill_row placed them
            for s, file in zip(self.samples.starts[i].tolist(), self.samples.images[i]):
                image_index[at + s:at + s + T] = len(files) * T + np.arange(T)
                files.append(file)
            at += len(self.samples.ids[i])
        row["loss_mask"][image_index >= 0] = 0  # an image position predicts nothing
        row["image_index"] = image_index
        row["images"] = self._pixels(files)
        return row

    def _pixels(self, files: List[str]) -> torch.Tensor:
        if not files:
            return self._no_images()
        return torch.stack([self._image(file) for file in files])

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

            shape = self.vision.processor(Image.new("RGB", (64, 64))).shape
            self._empty = torch.zeros((0, *shape), dtype=torch.float32)
        return self._empty

    def collate(self, items: List[dict]):
        batch = self.collate_items([{k: v for k, v in item.items() if k not in _VISION_KEYS} for item in items],
                                   self.packing)
        T, before, index = self.vision.image_seq_length, 0, []
        for item in items:  # renumber: image k of a row is image (images of earlier rows) + k of the micro-batch
            local = torch.from_numpy(item["image_index"])
            index.append(torch.where(local >= 0, local + before * T, local))
            before += len(item["images"])
        batch.images = torch.cat([item["images"] for item in items])
        batch.image_index = torch.stack(index)
        return batch


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
                   f"samples with {images} images ({vision.image_seq_length} tokens each), {counts.skipped} bad "
                   f"rows skipped, {counts.truncated} truncated, {counts.dropped} dropped)")
    return VLRows(samples, seq_length, tokenizer.pad, data_cfg.packing, description, vision)
