"""Images for vision-language rows: the vision encoder's own image processor, and reading image files.

Pixels are made by the transformers image processor that belongs to the
vision encoder (``preprocessor_config.json`` of the HF model folder), so a
model fine-tuned here sees exactly what transformers' LlavaProcessor would
give it; nothing is resized or normalised by hand. The PIL/numpy processors
are asked for explicitly: torchvision, which the fast ones need, is not a
dependency.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from megatron_swift.data.conversations import RowError

_CLIP = ("clip", "clip_vision_model")
_SIGLIP = ("siglip", "siglip_vision_model")


@dataclass
class VisionData:
    """What the data side needs of a vision-language model (made by the model side).

    ``image_token``: the tag rows write where an image goes ("<image>"); ``image_token_id``: the token id that
    marks each image position; ``image_seq_length``: T, the positions (features) one image takes;
    ``processor``: PIL image -> float32 tensor [3, H, W] (see :func:`load_image_processor`)."""

    image_token: str
    image_token_id: int
    image_seq_length: int
    processor: Callable[[Any], Any]
    # A held tower's images (models/held_tower.py, e.g. Qwen2.5-VL), all None/empty for LLaVA:
    # tokens_for(file) -> T of that image (the processor's own count from the image's size; None: every image
    # has image_seq_length); processor(image) then gives the tower's inputs for one image ({name: tensor},
    # concatenated along dim 0 over a micro-batch); wrap: the token ids written before and after each image's
    # T tokens (Qwen's vision start / end); positions(ids, media of the sample's images) -> [3, n] M-RoPE
    # positions of one sample (None: 1-D positions).
    tokens_for: Optional[Callable[[str], int]] = None
    wrap: Tuple[Tuple[int, ...], Tuple[int, ...]] = ((), ())
    positions: Optional[Callable[[Any, list], Any]] = None
    count: Optional[Callable[[dict], int]] = None  # T of one processed image (its media), checked at fetch
    video: Optional[Any] = None  # data.videos.VideoData of a model that takes videos (None: rows with videos refused)

    @property
    def held(self) -> bool:
        return self.tokens_for is not None


class ImageProcessor:
    """A transformers image processor applied to one PIL image: float32 [3, H, W]."""

    def __init__(self, hf_processor):
        self.hf = hf_processor

    def __call__(self, image) -> torch.Tensor:
        pixels = self.hf(images=[image], return_tensors="pt")["pixel_values"]
        return pixels[0].to(torch.float32)

    def __repr__(self) -> str:
        return f"ImageProcessor({type(self.hf).__name__})"


class TiledImageProcessor(ImageProcessor):
    """A tiling transformers image processor (GotOcr2's ``crop_to_patches``: the tiles of the best grid for the
    image's aspect ratio plus a thumbnail, as InternVLProcessor asks for them) applied to one PIL image: float32
    [tiles, 3, H, W]; ``tiles(width, height)`` counts them from the size alone (its own formula)."""

    def __init__(self, hf_processor, **limits):
        super().__init__(hf_processor)
        self.settings = {"crop_to_patches": True, **{k: v for k, v in limits.items() if v is not None}}

    def __call__(self, image) -> torch.Tensor:
        return self.hf(images=[image], return_tensors="pt", **self.settings)["pixel_values"].to(torch.float32)

    def tiles(self, width: int, height: int) -> int:
        return self.hf.get_number_of_image_patches(height, width, dict(self.settings))


def tile_limits(data_cfg, side: int) -> dict:
    """data.min_pixels / max_pixels as a tiling processor's min_patches / max_patches (tiles of side x side)."""
    limits = {}
    for key, name in (("min_pixels", "min_patches"), ("max_pixels", "max_patches")):
        value = data_cfg.get(key)
        if value is not None:
            limits[name] = max(1, int(value) // (side * side))
    return limits


def tiled_processor(folder: Optional[str], side: int, data_cfg) -> TiledImageProcessor:
    """The tiling image processor of the HF model ``folder`` (GotOcr2ImageProcessor, its PIL backend), or
    transformers' default one for ``side``-pixel tiles when the model has no folder; data.min/max_pixels applied."""
    if folder and _has_image_processor(folder):
        hf = _auto_processor(folder)
    else:
        import transformers

        cls = getattr(transformers, "GotOcr2ImageProcessorPil", None) or transformers.GotOcr2ImageProcessor
        hf = cls(size={"height": side, "width": side})
    return TiledImageProcessor(hf, **tile_limits(data_cfg, side))


def load_image_processor(folder: Optional[str], fallback_model_type: Optional[str] = None,
                         image_size: Optional[int] = None, **overrides) -> ImageProcessor:
    """The image processor of the HF model ``folder`` (its preprocessor_config.json, or the "image_processor" of
    the processor_config.json transformers 5 writes); a folder without one (or None, a model built from scratch)
    gets the default processor of ``fallback_model_type`` (clip or siglip, also as *_vision_model) for square
    images of ``image_size``."""
    if folder and _has_image_processor(folder):
        return ImageProcessor(_auto_processor(folder, **overrides))
    if image_size is None or fallback_model_type not in _CLIP + _SIGLIP:
        raise ValueError(f"no image processor (preprocessor_config.json) in {folder} and no default one for vision "
                         f"model type {fallback_model_type!r} (clip or siglip) with image size {image_size}")
    return ImageProcessor(_default_processor(fallback_model_type, image_size))


def _has_image_processor(folder: str) -> bool:
    if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        return True
    processor = os.path.join(folder, "processor_config.json")
    if not os.path.isfile(processor):
        return False
    with open(processor, encoding="utf-8") as f:
        return "image_processor" in json.load(f)


def _auto_processor(folder: str, **overrides):
    import transformers

    # transformers 5 picks the torchvision ("fast") processor when it can and names the PIL one backend="pil";
    # 4.x has use_fast=False for the same thing.
    choice = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                           **choice, **overrides)


def _default_processor(model_type: str, image_size: int):
    import transformers

    square = {"height": image_size, "width": image_size}
    if model_type in _CLIP:  # resize the shortest edge, then crop the centre square (OpenAI CLIP mean/std)
        cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        return cls(size={"shortest_edge": image_size}, crop_size=square)
    cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    return cls(size=square)  # resize to the square; mean/std 0.5


def image_path(name, jsonl_path: str) -> str:
    """Where image ``name`` of a row of ``jsonl_path`` is: relative names are under the JSONL file's folder."""
    if not isinstance(name, str) or not name:
        raise RowError(f"image {name!r}: expected a file path (a string)")
    return os.path.join(os.path.dirname(os.path.abspath(jsonl_path)), os.path.expanduser(name))


def image_problem(path: str) -> Optional[str]:
    """Why the image file at ``path`` cannot be used (None: it opens as an image). Cheap: the header and
    structure are checked (PIL ``verify``), the pixels are not decoded."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        return f"not found at {path}"
    try:
        with Image.open(path) as image:
            image.verify()
    except UnidentifiedImageError:
        return f"{path} is not an image file PIL can read"
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports broken files with these
        return f"{path} cannot be read as an image ({e})"
    return None


def upright_size(path: str) -> Tuple[int, int]:
    """(width, height) of the image at ``path`` as :func:`open_image` turns it (EXIF orientations 5-8 swap
    them); reads the header only."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        return (height, width) if image.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (width, height)


def open_image(path: str):
    """The image at ``path`` as RGB, turned upright by its EXIF orientation (as transformers' load_image does)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def vision_data(cfg, arch) -> Optional[VisionData]:
    """What the data side needs of the run's VLM (None for a text model): its image token, the image tokens per
    image, and its encoder's image processor (model.pretrained's or model.vision's, else the default one)."""
    if arch.vision_hf is not None:  # a held tower: its family knows its processor, tokens and positions
        return arch.family.vision_data(cfg, arch) if cfg.data.source == "vl_sft" else None
    if arch.vision is None:
        return None
    from megatron_swift.models.vision_arch import image_seq_length

    folder = cfg.model.pretrained or cfg.model.get("vision")
    processor = load_image_processor(folder, arch.vision.model_type, arch.vision.image_size)
    return VisionData("<image>", arch.image_token_id, image_seq_length(arch.vision, arch.vision_select), processor)
