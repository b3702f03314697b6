"""InternVL 3 / 3.5 in transformers' native format (HF ``InternVLForConditionalGeneration``, model_type
"internvl", the ``-hf`` checkpoints): InternViT (layer scale, optional QK norm, LayerNorm or RMSNorm), pixel
shuffle, an MLP projector (LayerNorm -> Linear -> GELU -> Linear) and a Qwen2.5 or Qwen3 language model.

The vision tower and projector are held as the transformers modules themselves, whole on each TP rank of the
first pipeline stage (models/held_tower.py); their features are transformers' ``get_image_features`` by
construction. The language model is the text family's megatron-core GPTModel. Images are tiled by the folder's
own ``GotOcr2ImageProcessor`` (crop_to_patches plus a thumbnail); each tile gives ``image_seq_length`` tokens
between ``<img>`` and ``</img>`` (data/images.py).

The original remote-code folders (``InternVLChatModel``) are refused with one line naming the ``-hf``
checkpoint to use instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megatron_swift.convert.rules import Direct
from megatron_swift.convert.tables import prefixed
from megatron_swift.data.errors import DataError
from megatron_swift.models.families.base import Family, Size

# The canonical on-disk spellings (what transformers 5 writes, and 4.x before 4.52); 4.52+ keeps "model." in
# front of the tower, the projector and the language model, and the head at the top. The exporter writes these.
_TOWER, _PROJ, _LM = "vision_tower.", "multi_modal_projector.", "language_model."
_ALIASES = (("model.vision_tower.", _TOWER), ("model.multi_modal_projector.", _PROJ),
            ("model.language_model.", _LM + "model."), ("lm_head.", _LM + "lm_head."))
# The megatron parameters of the held modules: vision_model.hf.<HF name below the model>.
HELD = "vision_model.hf."
REMOTE_CODE = "InternVLChatModel"
# train.freeze groups of the held modules (tuners.FREEZE_GROUPS' "vision" would take the projector too).
FREEZE_GROUPS = {"vision": r"^vision_model\.hf\.vision_tower\.",
                 "projector": r"^vision_model\.hf\.multi_modal_projector\."}

# Keys of an HF InternVL vision_config that describe the tower (the rest is transformers' bookkeeping).
_VISION_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "attention_bias", "use_qk_norm",
                "intermediate_size", "hidden_act", "norm_type", "layer_norm_eps", "image_size", "patch_size",
                "num_channels", "use_mask_token", "use_absolute_position_embeddings", "layer_scale_init_value",
                "use_mean_pooling", "hidden_dropout_prob", "attention_dropout", "projection_dropout",
                "initializer_range")


def _side(value) -> int:
    """transformers writes image_size / patch_size as [h, w]; InternVL tiles are square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square {value} is not supported (InternVL tiles are square)")
        return int(value[0])
    return int(value)


def tokens_per_tile(vision: dict, ratio: float) -> int:
    """Image tokens one tile gives: its patches after pixel shuffle by ``ratio`` (InternVL3: 448/14, 0.5 -> 256)."""
    side = _side(vision["image_size"]) // _side(vision["patch_size"])
    return int(side * ratio) ** 2


def remote_code_refusal(hf: dict, folder: str) -> str:
    """The one line for an original (remote-code) InternVL folder: which -hf checkpoint to use instead."""
    name = os.path.basename(os.path.normpath(folder)) or "InternVL3-1B"
    return (f"architectures {hf.get('architectures')}: the original remote-code InternVL format is not loaded "
            f"(its code would have to run); use the transformers-native checkpoint OpenGVLab/{name}-hf "
            f"(InternVLForConditionalGeneration)")


@dataclass(frozen=True)
class InternVLFamily(Family):
    """The family spec of InternVL (-hf): Family's hooks for its nested config, its held tower and its table."""

    def read_hf(self, hf: dict, folder: str) -> dict:
        where = os.path.join(folder, "config.json")
        if REMOTE_CODE in (hf.get("architectures") or []) or "llm_config" in hf:
            raise DataError(where, None, remote_code_refusal(hf, folder))
        vision = dict(hf.get("vision_config") or {})
        layer, select = hf.get("vision_feature_layer", -1), hf.get("vision_feature_select_strategy", "default")
        ratio = float(hf.get("downsample_ratio", 0.5))
        problems = []
        if vision.get("model_type", "internvl_vision") != "internvl_vision":
            problems.append(f"vision_config.model_type={vision.get('model_type')!r} is not internvl_vision")
        if not isinstance(layer, int) or not -vision.get("num_hidden_layers", 0) <= layer < 0:
            problems.append(f"vision_feature_layer={layer}: one negative layer index of the tower is supported")
        if select not in ("default", "full"):
            problems.append(f"vision_feature_select_strategy={select!r} is not default or full")
        if problems:
            raise DataError(where, None, "; ".join(problems))
        try:
            per_tile = tokens_per_tile(vision, ratio)
            from megatron_swift.models import families

            text_cfg = hf.get("text_config") or {}
            text_family = families.by_hf_model_type(text_cfg.get("model_type", "qwen2"))
        except (KeyError, ValueError) as e:
            raise DataError(where, None, str(e).strip("'\"")) from None
        if hf.get("image_seq_length", per_tile) != per_tile:
            raise DataError(where, None, f"image_seq_length={hf['image_seq_length']} but a tile gives {per_tile} "
                                         f"tokens (image_size / patch_size and downsample_ratio={ratio})")
        tie = text_cfg.get("tie_word_embeddings", hf.get("tie_word_embeddings", False))
        fields = text_family.read_hf(dict(text_cfg, tie_word_embeddings=tie), folder)
        options = dict(fields.get("family_options") or {})
        options.update(downsample_ratio=ratio, vision_feature_layer=layer, image_seq_length=per_tile)
        fields.update(text_family=text_family.name, vision_hf={k: vision[k] for k in _VISION_KEYS if k in vision},
                      vision_select=select,
                      image_token_id=hf.get("image_token_id", hf.get("image_token_index")),
                      projector_activation=hf.get("projector_hidden_act", "gelu"), projector_bias=True,
                      family_options=options)
        return fields

    def write_hf(self, arch: dict, dtype: str) -> dict:
        from megatron_swift.models import families

        options = arch["family_options"]
        text = families.get(arch["text_family"]).write_hf(arch, dtype)
        for key in ("architectures", "torch_dtype", "dtype"):  # the top level carries the dtype
            text.pop(key, None)
        vision = dict(arch["vision_hf"], model_type="internvl_vision")
        return dict(architectures=[self.hf_architectures[0]], model_type=self.hf_model_type, text_config=text,
                    vision_config=vision, **({} if arch["image_token_id"] is None else
                                             {"image_token_id": arch["image_token_id"]}),
                    image_seq_length=options["image_seq_length"], downsample_ratio=options["downsample_ratio"],
                    projector_hidden_act=arch["projector_activation"],
                    vision_feature_layer=options["vision_feature_layer"],
                    vision_feature_select_strategy=arch["vision_select"],
                    tie_word_embeddings=text.get("tie_word_embeddings", False), torch_dtype=dtype)

    def build(self, arch, tconfig, padded_vocab: int, seq_length: int, backend, unfuse_norms: bool = False):
        """The language model's chunks; the first stage's first holds the tower and projector (transformers')."""
        from functools import partial

        from megatron_swift.models.held_tower import build_held_tower
        from megatron_swift.models.internvl_tower import build_internvl_tower, internvl_features
        from megatron_swift.models.vlm import build_held_vlm_chunks

        make = partial(build_internvl_tower, tower_config(arch))
        tower = partial(build_held_tower, make, internvl_features, backend.attention, backend.torch_device)
        return build_held_vlm_chunks(arch, tconfig, padded_vocab, seq_length, backend, tower, unfuse_norms,
                                     freeze_groups=FREEZE_GROUPS)

    def tower_params(self, arch) -> dict:
        """From the vision_config alone (the planner imports no torch): the class token (and mask token), the
        patch convolution, position embeddings; per layer Q/K/V (biases: attention_bias), QK RMSNorms
        (use_qk_norm), the output projection, the MLP, two norms (LayerNorm: weight and bias; RMSNorm: weight)
        and two layer scales; a final LayerNorm without mean pooling. The projector: LayerNorm over the pixel-
        shuffled width, then width -> H -> H, with biases."""
        v, h, f = arch.vision_hf, arch.vision_hf["hidden_size"], arch.vision_hf["intermediate_size"]
        patch, H = _side(v["patch_size"]), arch.hidden_size
        positions = (_side(v["image_size"]) // patch) ** 2 + 1
        norm = 2 * h if v.get("norm_type", "layer_norm") == "layer_norm" else h
        embed = h * (1 + bool(v.get("use_mask_token"))) + v.get("num_channels", 3) * patch ** 2 * h + h
        embed += positions * h if v.get("use_absolute_position_embeddings", True) else 0
        layer = (3 * h * h + 3 * h * bool(v.get("attention_bias")) + 2 * h * bool(v.get("use_qk_norm"))
                 + h * h + h + 2 * h * f + f + h + 2 * norm + 2 * h)
        final = 0 if v.get("use_mean_pooling", True) else 2 * h
        wide = h * int(1 / arch.family_options["downsample_ratio"]) ** 2
        return {"encoder": embed + v["num_hidden_layers"] * layer + final,
                "projector": 2 * wide + wide * H + H + H * H + H}

    def tower_flops_per_token(self, arch, train_vision: bool, image_tokens: Optional[int] = None) -> float:
        """Per LLM image token: the 1 / ratio^2 patches pixel shuffle folds into it (plus its share of the class
        token) through the patch embedding and every InternViT layer (Q/K/V + output 4h^2, MLP 2hf, scores and
        values 2h x the tile's positions: tiles have one size, ``image_tokens`` changes nothing), then the
        projector (LayerNorm, 4h -> H -> H). Training is 3x the
        forward, the tower's part 1x when it is frozen (train.train_vision=false); the projector always trains."""
        v, options = arch.vision_hf, arch.family_options
        h, f, depth = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
        patch, per_tile = _side(v["patch_size"]), options["image_seq_length"]
        positions = (_side(v["image_size"]) // patch) ** 2 + 1  # the tile's patches and the class token
        shuffled = h * int(1 / options["downsample_ratio"]) ** 2
        embed = v.get("num_channels", 3) * patch ** 2 * h * (positions - 1) / per_tile
        tower = embed + depth * (4 * h * h + 2 * h * f + 2 * h * positions) * positions / per_tile
        projector = shuffled * arch.hidden_size + arch.hidden_size ** 2
        return 2 * ((3 if train_vision else 1) * tower + 3 * projector)

    def tower_image_grid(self, arch, max_pixels: Optional[int], max_tokens: Optional[int] = None):
        """(tiles, patches per side, patches per side) of the most tiles an image gets under ``max_pixels``:
        max_pixels // tile area tiles (None: GotOcr2's default max_patches, 12) plus the thumbnail, no more
        than ``max_tokens`` (what a row holds) take."""
        v = arch.vision_hf
        side = _side(v["image_size"])
        tiles = max(1, max_pixels // side ** 2) if max_pixels else 12
        tiles += 1 if tiles > 1 else 0
        if max_tokens:
            tiles = max(1, min(tiles, max_tokens // arch.family_options["image_seq_length"]))
        per_side = side // _side(v["patch_size"])
        return (tiles, per_side, per_side)

    def tower_image_tokens(self, arch, grid) -> int:
        """image_seq_length tokens a tile."""
        return grid[0] * arch.family_options["image_seq_length"]

    def tower_activation_bytes(self, arch, grids, train_tower: bool, train_merger: bool, eager: bool,
                               dtype_bytes: int) -> int:
        """Bytes autograd keeps for one micro-batch's tiles (``grids``: (tiles, patches per side, patches per side)
        each) through transformers' InternViT and projector: R = tiles x (patches + class token) rows, M tokens
        after pixel shuffle, d the compute dtype's bytes. A LayerNorm keeps its input, its output (the next
        linear's input) and per row its mean and 1/std in d; an RMSNorm its fp32 input, 1/rms (fp32), the
        normalised value and its output.

        - a trained tower: the pixels; per layer its two norms, QKV's inputs and V (R h d), Q and K (their
          projections, 2 R h d; with QK norm the two RMSNorms over h instead), the output projection's input and
          the layer-scaled attention and MLP outputs (3 R h d), the MLP's GELU input and output (2 R f d), and
          the attention: eager each tile's softmax (heads x L^2 in d), SDPA its log-sum-exp (4 heads R; its
          output is the projection's input);
        - the projector (a LayerNorm over the shuffled width, then two linears with GELU between): its
          LayerNorm's input and statistics and GELU's input, plus (trained) the LayerNorm's output and GELU's
          output."""
        v, H, d = arch.vision_hf, arch.hidden_size, dtype_bytes
        h, f, heads = v["hidden_size"], v["intermediate_size"], v["num_attention_heads"]
        grids = [tuple(int(x) for x in g) for g in grids]
        if not (train_tower or train_merger):
            return 0
        patches = sum(t * gh * gw for t, gh, gw in grids)
        R = sum(t * (gh * gw + 1) for t, gh, gw in grids)
        M = int(patches * arch.family_options["downsample_ratio"] ** 2)
        shuffled = patches * h  # the projector's input: M rows of 4h
        projector = shuffled * d + 2 * M * d + M * H * d + ((shuffled + M * H) * d if train_merger else 0)
        if not train_tower:
            return projector
        rms = v.get("norm_type", "rms_norm") == "rms_norm"
        norm = (4 + 2 * d) * R * h + 4 * R if rms else 2 * R * h * d + 2 * R * d
        qk = 2 * ((4 + 2 * d) * R * h + 4 * R if v.get("use_qk_norm") else R * h * d)
        if eager:  # its eager softmax runs in the compute dtype
            attention = heads * d * sum(t * (gh * gw + 1) ** 2 for t, gh, gw in grids)
        else:  # SDPA's output is already laid out as the output projection's input: one storage
            attention = 4 * heads * R
        layer = 2 * norm + qk + R * h * d + 3 * R * h * d + 2 * R * f * d + attention
        pixels = patches * v.get("num_channels", 3) * _side(v["patch_size"]) ** 2 * d
        return pixels + v["num_hidden_layers"] * layer + projector

    def vision_data(self, cfg, arch):
        """What vl_sft rows need (data/images.VisionData): the folder's own tiling image processor decides each
        image's tiles and pixels (data.min/max_pixels cap the tiles), each tile takes image_seq_length
        <IMG_CONTEXT> positions, each image sits between the tokenizer's <img> and </img> (as InternVLProcessor
        writes them); the pixels go to the held tower as its ``pixel_values``."""
        from megatron_swift.data.images import VisionData, tiled_processor, upright_size

        per_tile, folder = arch.family_options["image_seq_length"], cfg.model.pretrained
        tiles = tiled_processor(folder, _side(arch.vision_hf["image_size"]), cfg.data)
        wrap = _wrap_ids(folder)
        return VisionData("<image>", arch.image_token_id, per_tile, lambda image: {"pixel_values": tiles(image)},
                          tokens_for=lambda file: per_tile * tiles.tiles(*upright_size(file)),
                          wrap=((wrap[0],), (wrap[1],)) if wrap else ((), ()),
                          count=lambda media: per_tile * len(media["pixel_values"]))

    def check_inputs(self, folder: str, hf: dict, images: list, seq: int, generator) -> dict:
        """tools/convert/check.py --image: ``seq`` random text tokens before each image and after the last; each
        image as InternVLProcessor writes it (<img>, tiles x T <IMG_CONTEXT>, </img>; the wrap tokens only when
        the folder has a tokenizer), its tiles through the folder's own image processor."""
        import torch

        from megatron_swift.data.images import tiled_processor

        if REMOTE_CODE in (hf.get("architectures") or []) or "llm_config" in hf:
            raise DataError(os.path.join(folder, "config.json"), None, remote_code_refusal(hf, folder))
        vision, per_tile = hf.get("vision_config") or {}, tokens_per_tile(hf.get("vision_config") or {},
                                                                          float(hf.get("downsample_ratio", 0.5)))
        processor = tiled_processor(folder, _side(vision["image_size"]), {})
        pixels = [processor(image) for image in images]
        image_id, vocab = hf["image_token_id"], (hf.get("text_config") or hf)["vocab_size"]
        wrap = _wrap_ids(folder)
        special = torch.tensor([image_id, *wrap])

        def text():
            ids = torch.randint(0, vocab, (seq,), generator=generator)
            return torch.where(torch.isin(ids, special), 0, ids)

        parts = []
        for tiles in pixels:
            image = torch.full((len(tiles) * per_tile,), image_id)
            parts += [text(), *([torch.tensor(wrap[:1]), image, torch.tensor(wrap[1:])] if wrap else [image])]
        tokens = torch.cat([*parts, text()]).unsqueeze(0)
        is_image = tokens == image_id
        index = torch.where(is_image, is_image.long().cumsum(-1) - 1, -1)
        media = {"pixel_values": torch.cat(pixels)}
        return {"hf": dict(input_ids=tokens, **media), "megatron": dict(tokens=tokens, image_index=index, media=media)}

    def rules(self, arch) -> list:
        text = arch.decoder_family.weights(tied=not arch.untie_embeddings, head=arch.head)
        language = prefixed(text, "language_model.", {"model.": _LM + "model.", "lm_head.": _LM + "lm_head."})
        return language + _held_rules(arch)

    def canonical_hf_name(self, name: str) -> str:
        for alias, canonical in _ALIASES:
            if name.startswith(alias):
                return canonical + name[len(alias):]
        return name


def _wrap_tokens(folder):
    """The tokens InternVLProcessor writes around an image: the tokenizer's start_image_token / end_image_token
    (tokenizer_config.json, at its top or under extra_special_tokens); None for a model without a folder."""
    import json

    path = os.path.join(folder or "", "tokenizer_config.json")
    if not folder or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    named = config.get("extra_special_tokens")
    named = dict(named, **config) if isinstance(named, dict) else config
    return named.get("start_image_token", "<img>"), named.get("end_image_token", "</img>")


def tower_config(arch) -> dict:
    """The HF config the held modules are built from: the model's own, with a placeholder vocabulary when the
    tokenizer decides it (a model from scratch; the tower does not read it)."""
    config = FAMILY.write_hf(arch.plain(), "float32")
    config["text_config"]["vocab_size"] = config["text_config"].get("vocab_size") or 1
    return config


def _wrap_ids(folder) -> list:
    """The ids of <img> and </img> in the folder's tokenizer ([] when it has none)."""
    wrap = _wrap_tokens(folder)
    if wrap is None or not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return []
    from megatron_swift.data.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(folder)
    ids = [tokenizer.encode_with_offsets(token)[0] for token in wrap]
    return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else []


def _held_rules(arch) -> list:
    """One Direct rule per parameter of the held modules (their HF names below ``model.``, read off the module
    built on the meta device: nothing allocated)."""
    import torch

    from megatron_swift.models.internvl_tower import build_internvl_tower

    with torch.device("meta"):
        tower = build_internvl_tower(tower_config(arch), "eager")
    return [Direct((HELD + name,), name) for name, _ in tower.named_parameters()]


_TINY_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, attention_bias=True,
                    use_qk_norm=False, intermediate_size=64, hidden_act="gelu", norm_type="layer_norm",
                    layer_norm_eps=1e-6, image_size=[56, 56], patch_size=[14, 14], num_channels=3,
                    use_mask_token=False, use_absolute_position_embeddings=True, layer_scale_init_value=0.1,
                    use_mean_pooling=True)
# InternViT-300M-448px (V2.5), the tower of InternVL3-1B/2B and InternVL3.5-1B/2B.
_VIT_300M = dict(_TINY_VISION, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 intermediate_size=4096, image_size=[448, 448], patch_size=[14, 14])


@dataclass(frozen=True)
class InternVLSize(Size):
    """A language-model size plus its family, the tower's HF vision_config and the InternVL numbers."""

    text_family: str = "qwen2"
    vision_hf: Optional[dict] = None
    image_token_id: Optional[int] = None  # None: the tokenizer's <IMG_CONTEXT> (or a token added for it)
    vision_select: str = "default"
    projector_activation: str = "gelu"


def _size(layers, hidden, ffn, heads, groups, text_family, vision, **text) -> InternVLSize:
    """A published (or test) size: the language model's numbers, its family and the tower's HF vision config."""
    options = dict(downsample_ratio=0.5, vision_feature_layer=-1, image_seq_length=tokens_per_tile(vision, 0.5))
    return InternVLSize(layers, hidden, ffn, heads, groups, text_family=text_family, vision_hf=vision,
                        family_options=options, **text)


_Q = dict(max_position_embeddings=32768, rotary_base=1e6, norm_epsilon=1e-6, untie_embeddings=False)

FAMILY = InternVLFamily(
    name="internvl",
    # The first is written on export; the remote-code one is registered so that its folders get read_hf's
    # one-line refusal rather than "unsupported architecture".
    hf_architectures=("InternVLForConditionalGeneration", REMOTE_CODE),
    hf_model_type="internvl",
    hf_head=_LM + "lm_head.weight",
    layers_prefix="language_model.decoder.layers.",
    sizes={
        # CPU-sized: a 2-layer Qwen2-like decoder and a 2-layer InternViT on 56 x 56 tiles (4 tokens each).
        "tiny": _size(2, 64, 128, 4, 2, "qwen2", _TINY_VISION, max_position_embeddings=1024,
                      untie_embeddings=False),
        # Language models as published (InternVL3: Qwen2.5, vocabulary 151674; InternVL3.5: Qwen3).
        "internvl3-1b": _size(24, 896, 4864, 14, 2, "qwen2", _VIT_300M, vocab_size=151674, **_Q),
        "internvl3-2b": _size(28, 1536, 8960, 12, 2, "qwen2", _VIT_300M, vocab_size=151674, **_Q),
        "internvl3.5-1b": _size(28, 1024, 3072, 16, 8, "qwen3", _VIT_300M, kv_channels=128, vocab_size=151936,
                                **dict(_Q, max_position_embeddings=40960)),
        "internvl3.5-2b": _size(28, 2048, 6144, 16, 8, "qwen3", _VIT_300M, kv_channels=128, vocab_size=151936,
                                **dict(_Q, max_position_embeddings=40960)),
    },
)
