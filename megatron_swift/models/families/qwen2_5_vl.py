"""Qwen2.5-VL (HF ``Qwen2_5_VLForConditionalGeneration``): transformers' own vision tower (14-px patches,
temporal patch 2, 2-D rotary, window attention with full-attention blocks, and the 2x2 patch merger that is
its projector) held whole on each TP rank (models/held_tower.py, docs/design/vlm/towers.md), and a Qwen2
language model on megatron-core with M-RoPE (three position streams split by ``mrope_section``; the positions
are transformers' ``get_rope_index``, models/mrope.py).

Names: the on-disk spelling of the published checkpoints is canonical (``visual.*``, ``model.*``,
``lm_head.*``; transformers 5 keeps it on save); its in-memory spelling (``model.visual.``,
``model.language_model.``) is read as an alias. The tower's parameter ``vision_model.hf.<n>`` is ``visual.<n>``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megatron_swift.convert.rules import Direct
from megatron_swift.convert.tables import prefixed
from megatron_swift.data.errors import DataError
from megatron_swift.models.families.base import Family, Size

_TOWER, _MTOWER = "visual.", "vision_model.hf."
_ALIASES = (("model.visual.", _TOWER), ("model.language_model.", "model."))
# Top-level HF keys kept in family_options (what the data side and the export need besides the numbers).
_TOKENS = ("video_token_id", "vision_start_token_id", "vision_end_token_id")
_HF_TEXT_TYPE = "qwen2_5_vl_text"
# train.freeze groups: the patch merger is the projector, the rest of the tower the vision group.
_FREEZE_GROUPS = {"vision": r"^vision_model\.hf\.(?!merger\.)", "projector": r"^vision_model\.hf\.merger\."}


@dataclass(frozen=True)
class QwenVLSize(Size):
    """A language-model size plus the HF vision_config of its tower and the image token."""

    text_family: str = "qwen2"
    vision_hf: Optional[dict] = None
    image_token_id: Optional[int] = None


def _vision_module_class():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    return modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel


def vision_config(vision_hf: dict):
    """transformers' vision config object of a stored vision_config dict."""
    import transformers

    return transformers.Qwen2_5_VLVisionConfig(**vision_hf)


def hf_config(arch) -> "object":
    """The transformers Qwen2_5_VLConfig of an architecture (what get_rope_index reads)."""
    import transformers

    plain = arch if isinstance(arch, dict) else arch.plain()
    return transformers.Qwen2_5_VLConfig(**FAMILY.write_hf(plain, "float32"))


def tower_features(module, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                   **_unused):
    """[N, lm_hidden]: the merged features of the micro-batch's images, then of its videos (the order
    image_index numbers them in), as transformers' get_image_features / get_video_features compute them."""
    import torch

    parts = []
    if pixel_values is not None and pixel_values.numel():
        parts.append(module(pixel_values, grid_thw=image_grid_thw).pooler_output)
    if pixel_values_videos is not None and pixel_values_videos.numel():
        parts.append(module(pixel_values_videos, grid_thw=video_grid_thw).pooler_output)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _split_rope(hf: dict, where: str):
    """(HF text config without M-RoPE's keys, mrope_section): the sections live in rope_parameters (5.x) or
    rope_scaling (4.x, ``type: mrope``); the rest is default RoPE for the text family to read."""
    hf = dict(hf)
    section = None
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key)
        if isinstance(rope, dict):
            rope = dict(rope)
            section = rope.pop("mrope_section", section)
            if rope.get("rope_type", rope.get("type")) in ("mrope", "default"):
                rope.pop("type", None)
                rope["rope_type"] = "default"
            hf[key] = rope
    if section is None:
        raise DataError(where, None, "rope_parameters.mrope_section is missing: a Qwen2.5-VL language model "
                                     "rotates by three position streams (e.g. [16, 24, 24])")
    return hf, [int(x) for x in section]


@dataclass(frozen=True)
class QwenVLFamily(Family):
    """The family spec of Qwen2.5-VL: each hook of Family for its nested HF config and held tower."""

    def read_hf(self, hf: dict, folder: str) -> dict:
        from megatron_swift.models import families

        where = os.path.join(folder, "config.json")
        text = {k: v for k, v in hf.items() if k not in ("text_config", "vision_config", "architectures")}
        text.update(hf.get("text_config") or {})  # 4.x configs have the text keys at the top level
        text, section = _split_rope(text, where)
        if text.get("use_sliding_window"):
            raise DataError(where, None, "use_sliding_window=true: sliding-window attention in the language "
                                         "model is not supported (the published Qwen2.5-VL checkpoints have false)")
        if 2 * sum(section) != (text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]):
            raise DataError(where, None, f"mrope_section={section} must sum to half the head dimension")
        fields = families.get("qwen2").read_hf(text, folder)
        vision = dict(hf.get("vision_config") or {})
        vision.pop("transformers_version", None)
        fields.update(text_family="qwen2", vision_hf=vision, image_token_id=hf.get("image_token_id", 151655),
                      family_options=dict(mrope_section=section, **{k: hf[k] for k in _TOKENS if k in hf}))
        return fields

    def write_hf(self, arch: dict, dtype: str) -> dict:
        """A transformers 5 config.json (text_config / vision_config nested; transformers 4.46+ reads it too)."""
        from megatron_swift.models import families

        options = arch["family_options"]
        text = families.get("qwen2").write_hf(arch, dtype)
        for key in ("architectures", "torch_dtype", "dtype", "tie_word_embeddings"):
            text.pop(key, None)
        rope = text.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
        text.pop("rope_theta", None)
        if text.get("head_dim") == text["hidden_size"] // text["num_attention_heads"]:
            text.pop("head_dim")  # transformers' Qwen2.5-VL text config derives it
        text.update(model_type=_HF_TEXT_TYPE, rope_parameters=dict(rope, mrope_section=list(options["mrope_section"])))
        return dict(architectures=list(self.hf_architectures), model_type=self.hf_model_type, text_config=text,
                    vision_config=dict(arch["vision_hf"]), image_token_id=arch["image_token_id"],
                    **{k: options[k] for k in _TOKENS if k in options},
                    tie_word_embeddings=not arch["untie_embeddings"], dtype=dtype)

    def transformer_fields(self, arch) -> dict:
        return {"mrope_section": list(arch.family_options["mrope_section"])}

    def build(self, arch, tconfig, padded_vocab: int, seq_length: int, backend, unfuse_norms: bool = False):
        from megatron_swift.models.held_tower import build_held_tower
        from megatron_swift.models.vlm import build_held_vlm_chunks

        cls, config = _vision_module_class(), vision_config(arch.vision_hf)

        def tower():
            return build_held_tower(lambda attn: cls._from_config(config, attn_implementation=attn),
                                    tower_features, backend.attention, backend.torch_device)

        return build_held_vlm_chunks(arch, tconfig, padded_vocab, seq_length, backend, tower, unfuse_norms,
                                     _FREEZE_GROUPS)

    def rules(self, arch) -> list:
        text = arch.decoder_family.weights(tied=not arch.untie_embeddings, head=arch.head)
        return prefixed(text, "language_model.", {}) + [
            Direct((_MTOWER + name,), _TOWER + name) for name in tower_parameter_names(arch.vision_hf)]

    def check_inputs(self, folder: str, hf: dict, images: list, seq: int, generator) -> dict:
        return check_inputs(folder, hf, images, seq, generator)

    def tower_params(self, arch) -> dict:
        """From the vision_config alone (the planner imports no torch): the patch convolution (no bias), per block
        two RMSNorms, QKV and output projections and a gated MLP, all with biases; the merger (an RMSNorm over
        the tower width, then 4h -> 4h -> out with biases) is the projector."""
        v = arch.vision_hf
        h, f, patch = v["hidden_size"], v["intermediate_size"], v.get("patch_size", 14)
        wide = v.get("spatial_merge_size", 2) ** 2 * h
        embed = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * patch ** 2 * h
        block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * f + f) + (f * h + h)
        merger = h + (wide * wide + wide) + (wide * v["out_hidden_size"] + v["out_hidden_size"])
        return {"encoder": embed + v["depth"] * block, "projector": merger}

    def tower_flops_per_token(self, arch, train_vision: bool, image_tokens: Optional[int] = None) -> float:
        """Per LLM image token (merge^2 patches): patch embedding, the blocks (QKV + output 4h^2, gated MLP 3hf,
        scores and values 2h x the keys a patch attends to), and the merger (4h -> 4h -> out). The keys: in a
        full-attention block the image's P = image_tokens x merge^2 patches, in a windowed one a window's
        patches (at most P); without ``image_tokens`` (the image unknown) the full-attention blocks are counted
        as windows, a lower bound. Training is 3x the forward, the tower's part 1x when it is frozen
        (train.train_vision=false); the merger always trains."""
        v = arch.vision_hf
        h, f, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
        merge, patch, out = v.get("spatial_merge_size", 2), v.get("patch_size", 14), v["out_hidden_size"]
        patches = merge ** 2
        window = (v.get("window_size", 112) // patch) ** 2
        full_blocks = len(v.get("fullatt_block_indexes") or []) if image_tokens else 0
        keys = image_tokens * patches if image_tokens else window
        window = min(window, keys)
        embed = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * patch ** 2 * h
        block = 4 * h * h + 3 * h * f
        attention = 2 * h * (full_blocks * keys + (depth - full_blocks) * window)
        tower = patches * (embed + depth * block + attention)
        merger = (patches * h) ** 2 + patches * h * out
        return 2 * ((3 if train_vision else 1) * tower + 3 * merger)

    def tower_image_grid(self, arch, max_pixels: Optional[int], max_tokens: Optional[int] = None):
        """The (t, h, w) patch grid of the largest image the processor makes under ``max_pixels`` (None: the
        published processor's 12845056): its sides are multiples of patch x merge with h x w <= max_pixels
        (transformers' smart_resize), the most merged tokens (at most ``max_tokens``: what a row holds) taken
        near-square."""
        v = arch.vision_hf
        merge = v.get("spatial_merge_size", 2)
        return largest_grid(max_pixels or processor_defaults(v)["max_pixels"], v.get("patch_size", 14) * merge, merge,
                            max_tokens)

    def tower_image_tokens(self, arch, grid) -> int:
        """t x h x w patches, merge^2 to a token."""
        t, h, w = grid
        return t * h * w // arch.vision_hf.get("spatial_merge_size", 2) ** 2

    def tower_activation_bytes(self, arch, grids, train_tower: bool, train_merger: bool, eager: bool,
                               dtype_bytes: int) -> int:
        """Bytes autograd keeps for one micro-batch's images (``grids``: their (t, h, w) patch grids) through
        transformers' tower, as its ops save them (P patches, N = P / merge^2 tokens, d the compute dtype's
        bytes; the RMSNorms and rotary work in fp32):

        - a trained tower: the pixels (the patch convolution's input, P x 3 x 2 x 14^2 x d), the window-order
          index (8N), cos and sin (2 x 4 P x head_dim, shared by the blocks); per block its two RMSNorms (the
          fp32 input, 1/rms, the normalised value and the weighted output: (4 + 2d) P h + 4P each), QKV's output
          (3 P h d: V is a view of it), rotated Q and K (2 P h d), the output projection's input (P h d), the gated
          MLP (gate, SiLU, up, product: 4 P f d), and the attention: eager (model.attention_backend=local) keeps
          the fp32 softmax of every window or image (heads x L^2 each, and its copy in the compute dtype when
          that is not fp32); torch's SDPA its output (P h d) and log-sum-exp (4 x heads x P);
        - the merger: when the tower trains, its RMSNorm's fp32 input, 1/rms and the un-permuting index
          (4 P h + 4P + 8N) and GELU's input (P h d), plus when the merger trains too the normalised value, the
          RMSNorm's output and GELU's output (3 P h d); when only the merger trains 4 P h d + 8N (those four);
        - nothing when both are frozen."""
        v = arch.vision_hf
        h, f, heads, merge = v["hidden_size"], v["intermediate_size"], v["num_heads"], v.get("spatial_merge_size", 2)
        grids = [tuple(int(x) for x in g) for g in grids]
        P = sum(t * gh * gw for t, gh, gw in grids)
        N, d = P // merge ** 2, dtype_bytes
        if not train_tower:
            return 4 * P * h * d + 8 * N if train_merger else 0
        merger = (4 + (4 if train_merger else 1) * d) * P * h + 4 * P + 8 * N
        pixels = P * v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 14) ** 2 * d
        shared = pixels + 8 * N + 2 * 4 * P * (h // heads)
        block = (8 + 10 * d) * P * h + 8 * P + 4 * P * f * d
        total = merger + shared + v["depth"] * block
        if not eager:
            return total + v["depth"] * (P * h * d + 4 * heads * P)
        units = v.get("window_size", 112) // v.get("patch_size", 14) // merge  # a window's side in merged tokens
        full = sum(t * (gh * gw) ** 2 for t, gh, gw in grids)
        windows = sum(t * merge ** 4 * _square_chunks(gh // merge, units) * _square_chunks(gw // merge, units)
                      for t, gh, gw in grids)
        per_score = heads * (4 + (d if d != 4 else 0))
        full_blocks = len(v.get("fullatt_block_indexes") or [])
        return total + per_score * (full_blocks * full + (v["depth"] - full_blocks) * windows)

    def vision_data(self, cfg, arch):
        return vision_data(cfg, arch)

    def canonical_hf_name(self, name: str) -> str:
        for alias, canonical in _ALIASES:
            if name.startswith(alias):
                return canonical + name[len(alias):]
        return name



def check_inputs(folder: str, hf: dict, images: list, seq: int, generator, model_class: str = "Qwen2_5_VLModel",
                 config_class: str = "Qwen2_5_VLConfig") -> dict:
    """One row for tools/convert/check.py --image: random text with the images (through the folder's own image
    processor) between the vision start and end tokens, ``seq`` text tokens before each and after the last,
    as transformers' model takes it ("hf") and as ours does ("megatron": tokens, [3, 1, s] positions from
    transformers' ``model_class``'s get_rope_index over its ``config_class``, image_index, media)."""
    import torch
    import transformers

    from megatron_swift.data.images import load_image_processor
    from megatron_swift.models.mrope import hf_rope_index

    pixels = load_image_processor(folder).hf(images=list(images), return_tensors="pt")
    grid = pixels["image_grid_thw"]
    merge = hf["vision_config"].get("spatial_merge_size", 2)
    image_id, vocab = hf["image_token_id"], (hf.get("text_config") or hf)["vocab_size"]
    special = torch.tensor(sorted({image_id, *(hf[k] for k in _TOKENS if k in hf)}))

    def text():
        ids = torch.randint(0, vocab, (seq,), generator=generator)
        return torch.where(torch.isin(ids, special), 0, ids)

    parts = []
    for thw in grid.tolist():
        n = thw[0] * thw[1] * thw[2] // merge ** 2
        parts += [text(), torch.tensor([hf["vision_start_token_id"]]), torch.full((n,), image_id),
                  torch.tensor([hf["vision_end_token_id"]])]
    tokens = torch.cat([*parts, text()]).unsqueeze(0)
    types_ = (tokens == image_id).long()
    index = torch.where(types_.bool(), types_.cumsum(-1) - 1, -1)
    positions = hf_rope_index(getattr(transformers, model_class), getattr(transformers, config_class)(**hf),
                              tokens, types_, grid)
    media = {"pixel_values": pixels["pixel_values"], "image_grid_thw": grid}
    return {"hf": dict(input_ids=tokens, mm_token_type_ids=types_, **media),
            "megatron": dict(tokens=tokens, position_ids=positions, image_index=index, media=media)}


def vision_data(cfg, arch):
    """What vl_sft rows need: the folder's own image processor (data.min_pixels / max_pixels passed to it)
    decides each image's pixels, grid and token count; each <image> tag becomes <|vision_start|>, T image
    tokens, <|vision_end|>; positions are get_rope_index's per sample. Videos (<video> tags): frames through the
    same image processor at the video processor's sizes (data/videos.py; data.video_* settings)."""
    from megatron_swift.data.videos import folder_video_config, qwen_video_data, video_settings

    processor = folder_image_processor(cfg, FAMILY.name, processor_defaults(arch.vision_hf))
    settings = video_settings(folder_video_config(cfg.model.pretrained), cfg.data)
    video_id = arch.family_options.get("video_token_id")
    video = None if video_id is None else qwen_video_data(processor, settings, video_id)
    return qwen_vision_data(processor, arch, video=video)


def folder_image_processor(cfg, family: str, defaults: Optional[dict] = None):
    """transformers' image processor of model.pretrained, with data.min_pixels / max_pixels passed to it; without
    a folder (a model built from scratch: model.size) transformers' Qwen2-VL image processor with ``defaults``
    (the published checkpoints' preprocessor_config.json values for the family's patch and merge sizes)."""
    from megatron_swift.data.images import load_image_processor

    folder = cfg.model.pretrained
    overrides = {k: v for k, v in (("min_pixels", cfg.data.min_pixels), ("max_pixels", cfg.data.max_pixels))
                 if v is not None}
    if not folder:
        if defaults is None:
            raise DataError("model.pretrained", None, f"+model={family} with image rows needs "
                                                      "model.pretrained: the HF folder whose image processor makes the pixels")
        return default_image_processor(defaults, **overrides)
    return load_image_processor(folder, **overrides).hf


def default_image_processor(defaults: dict, **overrides):
    """transformers' (PIL) Qwen2-VL image processor built from ``defaults`` and ``overrides`` (min/max_pixels)."""
    import transformers

    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return cls(**{**defaults, **overrides})


def processor_defaults(vision_hf: dict) -> dict:
    """The preprocessor_config.json of the published Qwen2.5-VL checkpoints, for this tower's patch sizes
    (transformers' Qwen2-VL image processor: CLIP mean/std, 56x56 to 3584x3584 pixels)."""
    return dict(patch_size=vision_hf.get("patch_size", 14), temporal_patch_size=vision_hf.get("temporal_patch_size", 2),
                merge_size=vision_hf.get("spatial_merge_size", 2), min_pixels=3136, max_pixels=12845056)


def qwen_vision_data(processor, arch, model_class: str = "Qwen2_5_VLModel", config=None, video=None):
    """VisionData over a Qwen2-VL-style image processor (transformers') for the architecture ``arch``; the
    position streams are those of transformers' ``model_class`` (its ``get_rope_index``) over ``config``
    (default: this family's transformers config of ``arch``); ``video``: data.videos.VideoData (None: rows with
    videos are refused)."""
    import numpy as np
    import torch
    import transformers

    from megatron_swift.data.images import VisionData
    from megatron_swift.models.mrope import hf_rope_index

    merge = processor.merge_size
    options, image_id = arch.family_options, arch.image_token_id
    config = hf_config(arch) if config is None else config

    def tokens_for(file: str) -> int:
        height, width = _upright_size(file)
        return processor.get_number_of_image_patches(height, width, {}) // merge ** 2

    def process(image) -> dict:
        out = processor(images=[image], return_tensors="pt")
        return {"pixel_values": out["pixel_values"].to(torch.float32), "image_grid_thw": out["image_grid_thw"]}

    def positions(ids, media: list):
        tokens = torch.from_numpy(np.asarray(ids)).unsqueeze(0)

        def cat(name):
            parts = [m[name] for m in media if name in m]
            return torch.cat(parts) if parts else None

        types_ = (tokens == image_id).long()
        if video is not None:  # get_rope_index's token types: 1 image, 2 video
            types_ = torch.where(tokens == video.token_id, 2, types_)
        streams = hf_rope_index(getattr(transformers, model_class), config, tokens, types_, cat("image_grid_thw"),
                                cat("video_grid_thw"), cat("second_per_grid_ts"))
        return streams[:, 0].numpy()

    return VisionData("<image>", image_id, 0, process, tokens_for=tokens_for,
                      wrap=((options["vision_start_token_id"],), (options["vision_end_token_id"],)),
                      positions=positions, count=lambda media: int(media["image_grid_thw"].prod()) // merge ** 2,
                      video=video)


def _upright_size(file: str):
    """(height, width) of the image as data.images.open_image gives it (EXIF orientations 5-8 swap the sides),
    from the header alone."""
    from PIL import Image

    with Image.open(file) as image:
        width, height = image.size
        if image.getexif().get(0x0112) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def largest_grid(max_pixels: int, factor: int, merge: int, max_tokens: Optional[int] = None) -> tuple:
    """(1, h, w) patches of the largest near-square image with sides multiples of ``factor`` px and at most
    ``max_pixels`` pixels: U = max_pixels // factor^2 merged tokens (at most ``max_tokens``), as many as a
    side x (U // side) grid holds."""
    import math

    tokens = max(1, min(max_pixels // factor ** 2, max_tokens or max_pixels))
    side = max(1, math.isqrt(tokens))
    return (1, side * merge, tokens // side * merge)


def _square_chunks(n: int, size: int) -> int:
    """Sum of squares of the lengths ``n`` splits into: windows of ``size`` and the remainder (transformers'
    get_vision_window_index pads the grid to whole windows, the padding dropped)."""
    return (n // size) * size ** 2 + (n % size) ** 2


def tower_parameter_names(vision_hf: dict) -> list:
    """The tower's parameter names, read off the module built on the meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        module = _vision_module_class()._from_config(vision_config(vision_hf))
    return [name for name, _ in module.named_parameters()]


# Published configs (Qwen/Qwen2.5-VL-*-Instruct config.json): the 32B and 72B towers have a 3456-wide MLP.
_VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu",
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, model_type="qwen2_5_vl_vision")
_TOKEN_IDS = dict(video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
_Q = dict(max_position_embeddings=128000, rotary_base=1e6, norm_epsilon=1e-6, text_family="qwen2",
          image_token_id=151655)

FAMILY = QwenVLFamily(
    name="qwen2_5_vl",
    hf_architectures=("Qwen2_5_VLForConditionalGeneration",),
    hf_model_type="qwen2_5_vl",
    layers_prefix="language_model.decoder.layers.",
    sizes={
        # CPU-sized: a 2-layer Qwen2-like decoder (head dim 16: sections [2, 3, 3]) and a 2-block tower (one with
        # full attention) whose 28-px windows hold 2x2 merged tokens.
        "tiny": QwenVLSize(2, 64, 128, 4, 2, vocab_size=300, max_position_embeddings=1024, untie_embeddings=True,
                           text_family="qwen2", image_token_id=290,
                           vision_hf=dict(_VISION_7B, depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                          window_size=56, fullatt_block_indexes=[1], out_hidden_size=64),
                           family_options=dict(mrope_section=[2, 3, 3], video_token_id=291,
                                               vision_start_token_id=292, vision_end_token_id=293)),
        "3b": QwenVLSize(36, 2048, 11008, 16, 2, vocab_size=151936, untie_embeddings=False,
                         vision_hf=dict(_VISION_7B, out_hidden_size=2048),
                         family_options=dict(mrope_section=[16, 24, 24], **_TOKEN_IDS), **_Q),
        "7b": QwenVLSize(28, 3584, 18944, 28, 4, vocab_size=152064,
                         vision_hf=dict(_VISION_7B, out_hidden_size=3584),
                         family_options=dict(mrope_section=[16, 24, 24], **_TOKEN_IDS), **_Q),
        "32b": QwenVLSize(64, 5120, 27648, 40, 8, vocab_size=152064,
                          vision_hf=dict(_VISION_7B, intermediate_size=3456, out_hidden_size=5120),
                          family_options=dict(mrope_section=[16, 24, 24], **_TOKEN_IDS), **_Q),
        "72b": QwenVLSize(80, 8192, 29568, 64, 8, vocab_size=152064,
                          vision_hf=dict(_VISION_7B, intermediate_size=3456, out_hidden_size=8192),
                          family_options=dict(mrope_section=[16, 24, 24], **_TOKEN_IDS), **_Q),
    },
)
