"""Vision-language SFT rows: conversations whose text says where each image (or video) goes.

A row is an SFT row plus ``"images": ["img/001.jpg", ...]`` (paths relative to the JSONL file's folder), one
per ``<image>`` tag in its messages, in order. The conversation is rendered and masked exactly as data/sft.py
does; then every tag becomes T = ``image_seq_length`` copies of the model's image token id, the positions
where the model puts the image's T features (HF's convention: pre-expanded ids). Image positions carry no loss
(loss_mask 0) and are never a target. A tokenizer that has the tag as one special token (an HF LLaVA folder)
encodes the whole text and each tag's id is repeated T times, exactly what transformers' LlavaProcessor gives;
other tokenizers (byte, SentencePiece without the tag) encode the text between tags piece by piece. A row
without images encodes exactly as an SFT row.

Videos (a model whose VisionData has ``video``, e.g. Qwen2.5-VL): ``"videos": ["clip.mp4"]`` or
``"videos": [["f0.jpg", "f1.jpg", ...]]``, one per ``<video>`` tag, in order; each tag becomes the video's T
video token ids between the same wrap ids as an image (data/videos.py makes frames and pixels). A row's images
and videos are kept in the order their tags appear; feature rows are numbered the way the tower returns them:
a micro-batch's images first, then its videos (``image_index`` says which row goes where).

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

_VISION_KEYS = ("images", "image_index", "video_index")
IMAGE, VIDEO = 0, 1  # kinds of a sample's media entries


@dataclass
class VLSamples(_Samples):
    """SFT samples plus, per sample, the first position of each image or video, their files (a video: a file or
    a tuple of frame files) and T, in the order of their tags, and their kinds (IMAGE or VIDEO)."""

    starts: List[np.ndarray] = field(default_factory=list)
    images: List[tuple] = field(default_factory=list)
    counts: List[np.ndarray] = field(default_factory=list)  # T of each image (a held tower's vary per image)
    kinds: List[np.ndarray] = field(default_factory=list)


class ImageTokens:
    """Text -> (ids, offsets, image starts): the tokenizer's ids with each image tag as T image token ids."""

    def __init__(self, tokenizer, vision: VisionData):
        self.tokenizer, self.vision = tokenizer, vision
        tag_ids = tokenizer.encode_with_offsets(vision.image_token)[0]
        if len(tag_ids) == 1 and tag_ids[0] != vision.image_token_id:
            raise DataError(getattr(tokenizer, "folder", "data.tokenizer"), None,
                            f"the tokenizer encodes {vision.image_token} as token id {tag_ids[0]} but the model's "
                            f"image token id is {vision.image_token_id}")
        # the tag is one special token: encode the text as it is (a held tower's images are wrapped in their own
        # tokens: the text between tags is encoded piece by piece)
        self.whole = len(tag_ids) == 1 and not vision.held
        self._tag = re.compile(re.escape(vision.image_token))
        if vision.video is not None:  # <image> or <video>: each becomes its own token id
            self._tag = re.compile(f"{re.escape(vision.image_token)}|{re.escape(vision.video.tag)}")

    def kinds(self, text: str) -> np.ndarray:
        """IMAGE or VIDEO of each tag of ``text``, in order."""
        return np.asarray([IMAGE if m.group() == self.vision.image_token else VIDEO
                           for m in self._tag.finditer(text)], dtype=np.int64)

    def __call__(self, text: str, counts: Sequence[int] = ()):
        """``counts``: T of each image in order (a held tower's); empty: image_seq_length each."""
        ids, offsets, starts = self._whole(text) if self.whole else self._pieces(text, counts)
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

    def _pieces(self, text: str, counts: Sequence[int] = ()):
        """Encode the text between tags piece by piece (offsets into the whole text), T image (or video) ids per
        tag (between the vision's wrap ids, if any)."""
        image_id, (before, after) = self.vision.image_token_id, self.vision.wrap
        video_id = self.vision.video.token_id if self.vision.video is not None else None
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
                T = counts[k] if counts else self.vision.image_seq_length
                ids += list(before)
                starts.append(len(ids))
                ids += [image_id if match.group() == self.vision.image_token else video_id] * T + list(after)
                offsets += [match.span()] * (len(before) + T + len(after))
                pos = match.end()
        return ids, offsets, np.asarray(starts, dtype=np.int64)


class RowImages:
    """The image files of a row, resolved against its JSONL file and checked once each."""

    def __init__(self, vision: VisionData):
        self.vision = vision
        self._problems: Dict[str, Optional[str]] = {}
        self._video_problems: Dict[object, Optional[str]] = {}

    def files(self, row: dict, jsonl_path: str, tags: int) -> tuple:
        """The row's image files, one per image tag, resolved and checked."""
        return self._entries(row, "images", tags, self.vision.image_token, "image", "image file paths",
                             lambda name: image_path(name, jsonl_path), image_problem, self._problems)

    def videos(self, row: dict, jsonl_path: str, tags: int) -> tuple:
        """The row's videos (data/videos.py: a file path, or a tuple of frame files), one per <video> tag (a model
        without video input has none: VLSides refuses its rows with videos first)."""
        from megatron_swift.data.videos import video_entry

        video = self.vision.video
        return self._entries(row, "videos", tags, "<video>", "video", "video files (or of lists of frame files)",
                             lambda entry: video_entry(entry, jsonl_path), lambda path: video.problem(path),
                             self._video_problems)

    @staticmethod
    def _entries(row: dict, key: str, tags: int, tag: str, noun: str, kind: str, resolve, problem, seen: dict):
        """``row[key]`` (absent: none) resolved, one per tag, in order; each checked once (``seen`` caches the
        problem of every path)."""
        names = row.get(key)
        names = [] if names is None else names  # a row without media is a text-only conversation
        if not isinstance(names, list):
            raise RowError(f"'{key}' must be a list of {kind}")
        if tags != len(names):
            raise RowError(f"{tags} {tag} tag{'s' * (tags != 1)} but {len(names)} {noun}{'s' * (len(names) != 1)} "
                           f"('{key}' needs one {'file' if noun == 'image' else 'entry'} per tag, in order)")
        resolved = tuple(resolve(name) for name in names)
        for name, path in zip(names, resolved):
            if path not in seen:
                seen[path] = problem(path)
            if seen[path]:
                shown = f"'{name}'" if isinstance(name, str) else repr(name)
                raise RowError(f"{noun} {shown}: {seen[path]}")
        return resolved

    def video_tokens(self, video) -> int:
        """T of a (checked) video."""
        try:
            return self.vision.video.tokens(video)
        except (OSError, ValueError) as e:
            raise RowError(f"video '{video}': {e}") from None

    def tokens(self, file: str) -> int:
        """T of the image at ``file`` (checked already): the processor's count for a held tower's image."""
        if not self.vision.held:
            return self.vision.image_seq_length
        try:
            return self.vision.tokens_for(file)
        except (OSError, SyntaxError, ValueError) as e:
            raise RowError(f"image '{file}': {e}") from None


class VLSides:
    """Rendered messages whose <image> tags are a row's images -> one side (ids, targets, image starts, image
    files, T of each image); ``cut`` truncates a side without cutting an image (SFT rows, preference pairs)."""

    def __init__(self, template, tokenizer, vision: VisionData):
        self.template, self.vision = template, vision
        self.tokens, self.images = ImageTokens(tokenizer, vision), RowImages(vision)

    def __call__(self, messages: List[dict], row: dict, jsonl_path: str, loss_on: str) -> tuple:
        """(ids, targets, starts, media, counts, kinds): media are the row's images and videos in the order of
        their tags (kinds: IMAGE or VIDEO of each)."""
        vision, images = self.vision, self.images
        if row.get("videos") and vision.video is None:
            raise RowError("'videos': this model takes no video input (video rows: +model=qwen2_5_vl)")
        text, spans = self.template.spans(messages)
        if vision.video is not None:
            kinds = self.tokens.kinds(text)
            tags = int((kinds == IMAGE).sum())
        else:
            tags = text.count(vision.image_token)
            kinds = np.zeros(tags, dtype=np.int64)
        files = iter(images.files(row, jsonl_path, tags))
        videos = iter(images.videos(row, jsonl_path, int((kinds == VIDEO).sum())))
        media = tuple(next(files) if kind == IMAGE else next(videos) for kind in kinds.tolist())
        counts = np.asarray([images.tokens(m) if kind == IMAGE else images.video_tokens(m)
                             for m, kind in zip(media, kinds.tolist())], dtype=np.int64)
        ids, offsets, starts = self.tokens(text, counts.tolist() if vision.held else ())
        targets = loss_targets(messages, spans, offsets, loss_on)
        targets[_image_positions(starts, counts, len(ids))] = False
        return ids, targets, starts, media, counts, kinds

    def cut(self, side: tuple, length: int):
        ids, targets, starts, media, counts, kinds = side
        wrap = self.vision.wrap
        first, end = starts - len(wrap[0]), starts + counts + len(wrap[1])  # with its wrap tokens
        if any(a < length < b for a, b in zip(first.tolist(), end.tolist())):
            return None  # an image or video cut in two cannot be fed to the model: drop the row
        keep = end <= length
        return ids[:length], targets[:length], starts[keep], media[:int(keep.sum())], counts[keep], kinds[keep]


def no_videos(row) -> None:
    """Preference rows take images only (their sides share the row's media; videos there are not built yet)."""
    if isinstance(row, dict) and row.get("videos"):
        raise RowError("'videos': preference rows take images only (video rows: data=vl_sft)")


def vl_line_encoder(data_cfg, template, tokenizer, seq_length: int, counts: Counts, vision: VisionData):
    """``encode(line, path, line_no)`` -> (ids, targets, image starts, image files) of one row, or None
    (skipped or dropped; see sft.row_encoder)."""
    sides = VLSides(template, tokenizer, vision)
    where = {}  # the JSONL file of the line being encoded: image paths are relative to it

    def encode_row(row):
        return [sides(to_messages(row, data_cfg.format), row, where["path"], data_cfg.loss_on)]

    encode_sides = row_encoder(data_cfg, seq_length, counts, encode_row, "conversation", sides.cut)

    def encode_line(line: str, path: str, line_no: int):
        where["path"] = path
        encoded = encode_sides(line, path, line_no)
        return None if encoded is None else encoded[0]

    return encode_line


def _image_positions(starts: np.ndarray, counts: np.ndarray, length: int) -> np.ndarray:
    """Boolean mask of the positions that hold image tokens (``counts``: T of each image)."""
    mask = np.zeros(length, dtype=bool)
    for s, T in zip(starts.tolist(), counts.tolist()):
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

    @property
    def image_tokens_per_row(self) -> float:
        """Mean image tokens per row (a held tower's FLOPs follow its images' sizes)."""
        return sum(int(c.sum()) for c in self.samples.counts) / max(1, len(self.rows))

    @property
    def image_sizes(self) -> dict:
        """{image tokens: mean images of that many tokens per row} (a held tower's attention FLOPs grow with
        each image's own size; videos, whose frames attend one by one, are left to image_tokens_per_row)."""
        sizes: dict = {}
        for counts, kinds in zip(self.samples.counts, self.samples.kinds):
            for tokens in counts[kinds == IMAGE].tolist():
                sizes[int(tokens)] = sizes.get(int(tokens), 0) + 1
        return {tokens: n / max(1, len(self.rows)) for tokens, n in sizes.items()}

    def __getitem__(self, index: int) -> dict:
        row = super().__getitem__(index)
        # feature rows of the row's images and of its videos, each numbered from 0 in order (collate puts a
        # micro-batch's video rows after all its image rows, the order the tower returns them in)
        indexes = {IMAGE: np.full(self.seq_length, -1, dtype=np.int64),
                   VIDEO: np.full(self.seq_length, -1, dtype=np.int64)}
        features = {IMAGE: 0, VIDEO: 0}
        files, kinds = [], []
        at = 0
        for i in self.rows[index]:  # the samples in the order fill_row placed them
            for s, file, T, kind in zip(self.samples.starts[i].tolist(), self.samples.images[i],
                                        self.samples.counts[i].tolist(), self.samples.kinds[i].tolist()):
                indexes[kind][at + s:at + s + T] = features[kind] + np.arange(T)
                files.append(file)
                kinds.append(kind)
                features[kind] += T
            at += len(self.samples.ids[i])
        row["loss_mask"][(indexes[IMAGE] >= 0) | (indexes[VIDEO] >= 0)] = 0  # a media position predicts nothing
        row["image_index"], row["video_index"] = indexes[IMAGE], indexes[VIDEO]
        if self.vision.held:
            media = [self._media(file) if kind == IMAGE else self._video(file) for file, kind in zip(files, kinds)]
            row["images"] = media
            if self.vision.positions is not None:
                row["positions"] = self._positions(index, media)
        else:
            row["images"] = self._pixels(files)
        return row

    def _media(self, file: str) -> dict:
        """A held tower's inputs for one image; its token count must be the one the row was made with."""
        media = self._image(file)
        if self.vision.tokens_for(file) != self.vision.count(media):
            raise DataError(file, None, "the image processor gives this image a different number of tokens than "
                                        "when the data was read")
        return media

    def _video(self, video) -> dict:
        """The tower's inputs for one video; its token count must be the one the row was made with."""
        where = video if isinstance(video, str) else video[0]
        try:
            media = self.vision.video.media(video)
        except (OSError, ValueError) as e:
            raise DataError(where, None, f"video cannot be read any more ({e}); it could when the data was read")
        if self.vision.video.tokens(video) != self.vision.video.count(media):
            raise DataError(where, None, "the video gives a different number of tokens than when the data was read")
        return media

    def _positions(self, index: int, media: List[dict]) -> np.ndarray:
        """[3, S] M-RoPE positions: each sample's own (from its ids and images), restarting per sample as 1-D
        positions do; padding continues 0, 1, ... in all three streams."""
        positions = np.tile(np.arange(self.seq_length, dtype=np.int64), (3, 1))
        at = k = 0
        for i in self.rows[index]:
            ids, n = self.samples.ids[i], len(self.samples.images[i])
            positions[:, at:at + len(ids)] = self.vision.positions(ids, media[k:k + n])
            at, k = at + len(ids), k + n
        positions[:, at:] = np.arange(self.seq_length - at)
        return positions

    def _pixels(self, files: List[str]) -> torch.Tensor:
        if not files:
            return self._no_images()
        return torch.stack([self._image(file) for file in files])

    def _image(self, file: str) -> torch.Tensor:
        try:
            image = open_image(file)
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(file, None, f"image cannot be read any more ({e}); it could when the data was read")
        out = self.vision.processor(image)
        return out if self.vision.held else out.to(torch.float32)

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
        batch.image_index = torch.stack(_feature_index(items))
        if self.vision.held:
            media = [m for item in items for m in item["images"]]
            batch.media = _concat_media(media) if media else None
            if batch.position_ids.dim() == 3:  # [b, 3, s] -> M-RoPE's [3, b, s]
                batch.position_ids = batch.position_ids.transpose(0, 1).contiguous()
        else:
            batch.images = torch.cat([item["images"] for item in items])
        return batch


def _feature_index(items: List[dict]) -> List[torch.Tensor]:
    """Each row's image_index numbered over the micro-batch: the image feature rows of all its rows, row after
    row, then their video feature rows (the tower's order: images, then videos)."""
    images = sum(int((item["image_index"] >= 0).sum()) for item in items)
    before, index = {"image_index": 0, "video_index": images}, []
    for item in items:
        row = torch.full(item["image_index"].shape, -1, dtype=torch.int64)
        for key in before:
            local = torch.from_numpy(item[key]) if key in item else None
            if local is not None:
                row = torch.where(local >= 0, local + before[key], row)
                before[key] += int((local >= 0).sum())
        index.append(row)
    return index


def _concat_media(media: List[dict]) -> dict:
    """{name: the tensors of every image or video that has it, concatenated in order} (images and videos
    have different names: a micro-batch's pixel_values are its images', pixel_values_videos its videos')."""
    names = dict.fromkeys(k for m in media for k in m)
    return {k: torch.cat([m[k] for m in media if k in m]) for k in names}


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
    images = sum(int((kinds == IMAGE).sum()) for kinds in samples.kinds)
    videos = sum(int((kinds == VIDEO).sum()) for kinds in samples.kinds)
    tokens = (f"{sum(int(c.sum()) for c in samples.counts)} image tokens in all" if vision.held
              else f"{vision.image_seq_length} tokens each")
    with_videos = f" and {videos} videos" if videos else ""
    description = (f"vl_sft:{','.join(paths)} ({counts.rows} rows, template {template.name}: {len(samples.ids)} "
                   f"samples with {images} images{with_videos} ({tokens}), {counts.skipped} bad "
                   f"rows skipped, {counts.truncated} truncated, {counts.dropped} dropped)")
    return VLRows(samples, seq_length, tokenizer.pad, data_cfg.packing, description, vision)
