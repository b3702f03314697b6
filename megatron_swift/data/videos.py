"""Videos for vision-language rows: decoding files with PyAV, sampling their frames, and a Qwen2-VL-style
model's video inputs made by its own (PIL) image processor.

A row's video is a file (``"clip.mp4"``) or a list of frame image files (``["f0.jpg", "f1.jpg", ...]``).

- Files are decoded with PyAV (the optional extra ``pip install -e ".[video]"``). Frames are sampled as
  transformers 5's ``Qwen2VLVideoProcessor.sample_frames`` does when asked for ``fps`` (its
  ``do_sample_frames=True`` path; qwen-vl-utils rounds differently): n = total / video fps x data.video_fps,
  clamped to [min_frames, min(max_frames, total)], floored to a multiple of temporal_patch_size, taken at
  ``arange(0, total, total / n)``; the sampled rate is n / total x the video's fps (its ``sampled_fps``).
- A list of frame files is used whole; its frames are taken to be data.video_fps apart.

Pixels: transformers' video processor needs torchvision, which this project cannot install beside its CPU
torch, so every frame goes through the folder's PIL image processor instead (transformers' resize and
normalisation), all frames of a video at one size (smart_resize with the video min/max pixels), and the frames
are grouped in temporal pairs into ``pixel_values_videos`` rows exactly as the video processor's ``patchify``
lays them out (an odd count repeats the last frame), with ``video_grid_thw`` [t, h, w] and
``second_per_grid_ts`` = temporal_patch_size / sampled fps (transformers' Qwen2_5_VLProcessor).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from megatron_swift.data.conversations import RowError
from megatron_swift.data.images import image_path, image_problem, open_image, upright_size

# transformers 5.25's Qwen2VLVideoProcessor class defaults (models/qwen2_vl/video_processing_qwen2_vl.py; the
# class cannot be imported here: its module imports torchvision): size shortest_edge / longest_edge are the
# video min / max pixels.
QWEN2_VL_VIDEO_DEFAULTS = dict(min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768, min_frames=4, max_frames=768)
# Per-frame settings of a video processor config passed on to the image processor as they are.
_PIXEL_KEYS = ("image_mean", "image_std", "rescale_factor", "do_rescale", "do_normalize", "resample")

Video = Union[str, Tuple[str, ...]]  # a resolved file path, or the resolved paths of its frame files


def _av():
    try:
        import av
    except ImportError:
        raise RowError('videos need PyAV: pip install -e ".[video]"') from None
    return av


@dataclass
class VideoSettings:
    """How a video becomes frames and pixels (see :func:`video_settings`)."""

    fps: float = 2.0
    min_frames: int = QWEN2_VL_VIDEO_DEFAULTS["min_frames"]
    max_frames: int = QWEN2_VL_VIDEO_DEFAULTS["max_frames"]
    min_pixels: int = QWEN2_VL_VIDEO_DEFAULTS["min_pixels"]
    max_pixels: int = QWEN2_VL_VIDEO_DEFAULTS["max_pixels"]
    pixels: Dict[str, Any] = field(default_factory=dict)  # _PIXEL_KEYS the folder's video config sets


def folder_video_config(folder: Optional[str]) -> dict:
    """The video processor dict transformers would load from ``folder``, in its order: processor_config.json's
    "video_processor", else video_preprocessor_config.json, else preprocessor_config.json; {} without any."""
    if not folder:
        return {}
    nested = os.path.join(folder, "processor_config.json")
    if os.path.isfile(nested):
        with open(nested, encoding="utf-8") as f:
            video = json.load(f).get("video_processor")
        if video is not None:
            return video
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return {}


def video_settings(config: dict, data_cfg) -> VideoSettings:
    """VideoSettings from a video processor dict (``size`` shortest/longest edge or min/max_pixels, min/max
    frames; the class defaults where missing) and data.video_fps / video_max_frames / video_min_pixels /
    video_max_pixels (which win when set)."""
    size = config.get("size") or {}
    values = dict(QWEN2_VL_VIDEO_DEFAULTS)
    for key, size_key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        values[key] = config.get(key) or size.get(size_key) or values[key]
    for key in ("min_frames", "max_frames"):
        values[key] = config.get(key, values[key])
    overrides = {"fps": data_cfg.get("video_fps"), "max_frames": data_cfg.get("video_max_frames"),
                 "min_pixels": data_cfg.get("video_min_pixels"), "max_pixels": data_cfg.get("video_max_pixels")}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return VideoSettings(**values, pixels={k: config[k] for k in _PIXEL_KEYS if k in config})


def sample_indices(total: int, video_fps: float, settings: VideoSettings, temporal: int) -> List[int]:
    """The frame indices transformers' Qwen2VLVideoProcessor.sample_frames takes at ``settings.fps`` (see the
    module docstring); a video with fewer than ``temporal`` frames has none to give."""
    max_frames = math.floor(min(settings.max_frames, total) / temporal) * temporal
    n = total / video_fps * settings.fps
    n = math.floor(min(max(n, settings.min_frames), max_frames, total) / temporal) * temporal
    if n <= 0:
        raise RowError(f"the video has {total} frame{'s' * (total != 1)}, fewer than the {temporal} one temporal "
                       "patch needs")
    return torch.arange(0, total, total / n).int().tolist()


@dataclass(frozen=True)
class VideoHeader:
    frames: int
    fps: float
    width: int
    height: int


def read_header(path: str) -> VideoHeader:
    """Frame count, frame rate and size of the first video stream of ``path`` (from the container, as
    transformers' read_video_pyav takes them; a container that does not say its frame count is counted)."""
    av = _av()
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("it has no video stream")
        stream = container.streams.video[0]
        frames, rate = stream.frames, stream.average_rate
        if not frames:
            frames = sum(1 for _ in container.decode(video=0))
        if not rate or not frames:
            raise ValueError("its frame rate or frame count is unknown")
        return VideoHeader(int(frames), float(rate), stream.width, stream.height)


def video_problem(video: Video) -> Optional[str]:
    """Why ``video`` cannot be used (None: it can). A file: its container and stream header are read; frames:
    each file's header, and all must have one size."""
    if isinstance(video, tuple):
        for frame in video:
            problem = image_problem(frame)
            if problem:
                return problem
        if len({upright_size(frame) for frame in video}) > 1:
            return "its frame files have different sizes (all frames of a video must have one size)"
        return None
    if not os.path.isfile(video):
        return f"not found at {video}"
    av = _av()
    try:
        read_header(video)
    except (av.FFmpegError, OSError, ValueError) as e:
        return f"{video} cannot be read as a video ({e})"
    return None


def _sampled(path: str, settings: VideoSettings, temporal: int) -> Tuple[VideoHeader, List[int], float]:
    """(header, the sampled frame indices, their rate in frames per second) of a video file."""
    header = read_header(path)
    indices = sample_indices(header.frames, header.fps, settings, temporal)
    return header, indices, len(indices) / header.frames * header.fps


def frame_plan(video: Video, settings: VideoSettings, temporal: int) -> Tuple[int, Tuple[int, int], float]:
    """(frames taken, (height, width) of a frame, their rate in frames per second) without decoding pixels."""
    if isinstance(video, tuple):
        width, height = upright_size(video[0])
        return len(video), (height, width), settings.fps
    header, indices, fps = _sampled(video, settings, temporal)
    return len(indices), (header.height, header.width), fps


def read_frames(video: Video, settings: VideoSettings, temporal: int) -> Tuple[list, float]:
    """(the sampled frames as RGB PIL images, their rate in frames per second)."""
    if isinstance(video, tuple):
        return [open_image(frame) for frame in video], settings.fps
    av = _av()
    _, indices, fps = _sampled(video, settings, temporal)
    wanted, frames = set(indices), []
    with av.open(video) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i > indices[-1]:
                break
            if i in wanted:
                frames.append(frame.to_image().convert("RGB"))
    if len(frames) != len(indices):
        raise ValueError(f"{len(frames)} of the {len(indices)} sampled frames decode")
    return frames, fps


class QwenVideo:
    """A Qwen2-VL-style model's video inputs made by its PIL image processor ``processor``
    (Qwen2VLImageProcessorPil): tokens(video) -> T and media(video) -> {pixel_values_videos, video_grid_thw,
    second_per_grid_ts}, both from :class:`VideoSettings`."""

    def __init__(self, processor, settings: VideoSettings):
        self.processor, self.settings = processor, settings
        self.patch, self.merge = processor.patch_size, processor.merge_size
        self.temporal = processor.temporal_patch_size

    def grid(self, frames: int, height: int, width: int) -> List[int]:
        """[t, h, w] of ``frames`` frames of that size (transformers' get_num_of_video_patches)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, self.patch * self.merge, self.settings.min_pixels,
                            self.settings.max_pixels)
        return [-(-frames // self.temporal), h // self.patch, w // self.patch]

    def tokens(self, video: Video) -> int:
        frames, (height, width), _ = frame_plan(video, self.settings, self.temporal)
        return math.prod(self.grid(frames, height, width)) // self.merge ** 2

    def media(self, video: Video) -> dict:
        frames, fps = read_frames(video, self.settings, self.temporal)
        pixels, grid = self.pixels(frames)
        return {"pixel_values_videos": pixels, "video_grid_thw": grid,
                "second_per_grid_ts": torch.tensor([self.temporal / fps], dtype=torch.float32)}

    def pixels(self, frames: Sequence) -> Tuple[torch.Tensor, torch.Tensor]:
        """([t*h*w, C*temporal*patch*patch] rows, [[t, h, w]]): each frame through the image processor at the
        video's size as one temporal slice, then the video processor's layout (rows by t, then the image's
        merged-patch order; within a row channel, time, patch y, patch x)."""
        size = {"shortest_edge": self.settings.min_pixels, "longest_edge": self.settings.max_pixels}
        out = self.processor(images=list(frames), return_tensors="pt", size=size, temporal_patch_size=1,
                             **self.settings.pixels)
        per_frame, (_, gh, gw) = len(out["pixel_values"]) // len(frames), out["image_grid_thw"][0].tolist()
        x = out["pixel_values"].to(torch.float32).reshape(len(frames), per_frame, 3, -1)  # [F, N, C, p*p]
        if pad := -len(frames) % self.temporal:  # as patchify: repeat the last frame
            x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        t = len(x) // self.temporal
        x = x.reshape(t, self.temporal, per_frame, 3, -1).permute(0, 2, 3, 1, 4)  # [t, N, C, temporal, p*p]
        return x.reshape(t * per_frame, -1).contiguous(), torch.tensor([[t, gh, gw]])

    def count(self, media: dict) -> int:
        return int(media["video_grid_thw"].prod()) // self.merge ** 2


@dataclass
class VideoData:
    """What vl_sft rows need for videos (made by the model side; None on VisionData: the model takes none).

    ``problem(video)`` -> why it cannot be used or None (cheap, at read); ``tokens(video)`` -> T;
    ``media(video)`` -> the tower's inputs of one video ({name: tensor}, concatenated over a micro-batch);
    ``count(media)`` -> T of processed media (checked at fetch)."""

    token_id: int
    tokens: Callable[[Video], int]
    media: Callable[[Video], dict]
    count: Callable[[dict], int]
    problem: Callable[[Video], Optional[str]] = video_problem
    tag: str = "<video>"


def qwen_video_data(processor, settings: VideoSettings, video_token_id: int) -> VideoData:
    videos = QwenVideo(processor, settings)
    return VideoData(video_token_id, videos.tokens, videos.media, videos.count)


def video_entry(entry, jsonl_path: str) -> Video:
    """A row's ``videos`` entry resolved against its JSONL file: a file path, or a non-empty list of frame
    files."""
    if isinstance(entry, list):
        if not entry:
            raise RowError("video []: a list of frame files needs at least one")
        return tuple(image_path(name, jsonl_path) for name in entry)
    if not isinstance(entry, str) or not entry:
        raise RowError(f"video {entry!r}: expected a file path or a list of frame files")
    return image_path(entry, jsonl_path)
