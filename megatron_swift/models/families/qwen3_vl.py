"""Qwen3-VL (HF ``Qwen3VLForConditionalGeneration``): transformers' own vision tower (16-px patches, learned
position embedding resampled to each grid + 2-D rotary, full attention, the 2x2 patch merger that is its
projector, and the DeepStack mergers) held whole on each TP rank (models/held_tower.py), and a Qwen3 language
model (QK norm) on megatron-core with interleaved M-RoPE and DeepStack (models/deepstack.py).

Interleaved M-RoPE: transformers' Qwen3-VL text rotary gives frequency j of each head the height stream when
j % 3 == 1 and j < 3 * section[1], the width stream when j % 3 == 2 and j < 3 * section[2], else the temporal
one. megatron-core 0.16.1's ``MultimodalRotaryEmbedding`` splits the frequencies into consecutive pieces of the
``mrope_section`` list's sizes and gives piece i stream i % 3, with no interleaving flag; but a piece may be
empty, so the interleaved layout is a list of runs padded with zero-size pieces (:func:`megatron_mrope_splits`),
and megatron-core's own module computes it unchanged.

Names: the checkpoints' spelling is transformers' in-memory one (``model.visual.*``, ``model.language_model.*``,
``lm_head.*``). The tower's parameter ``vision_model.hf.<n>`` is ``model.visual.<n>``.

The MoE variant (families/qwen3_vl_moe.py) is this family with another text family (Qwen3-MoE's layers on
megatron-core's MoE layer) and transformers' Qwen3VLMoe* classes; its checkpoints stack each layer's experts
(convert/rules.StackedExperts).
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Optional

from megatron_swift.convert.rules import Direct
from megatron_swift.convert.tables import prefixed
from megatron_swift.data.errors import DataError
from megatron_swift.models.families.base import Family
from megatron_swift.models.families.qwen2_5_vl import (_TOKENS, QwenVLSize, check_inputs, folder_image_processor,
                                                       qwen_vision_data)

_TOWER, _MTOWER = "model.visual.", "vision_model.hf."
_MAX_PIXELS = 16777216  # the published Qwen3-VL preprocessor_config.json's longest_edge (4096 x 4096)
# train.freeze groups: the patch merger and the DeepStack mergers are the projector, the rest the vision group.
_FREEZE_GROUPS = {"vision": r"^vision_model\.hf\.(?!merger\.|deepstack_merger_list\.)",
                  "projector": r"^vision_model\.hf\.(merger|deepstack_merger_list)\."}


def megatron_mrope_splits(section, half_dim: int) -> list:
    """megatron-core's ``mrope_section`` list (piece i -> stream i % 3) for transformers' interleaved Qwen3-VL
    layout of ``half_dim`` frequencies: runs of one stream, zero-size pieces to land each run on its stream."""
    streams = [0] * half_dim
    for stream in (1, 2):
        for j in range(stream, min(3 * section[stream], half_dim), 3):  # transformers slices as far as it goes
            streams[j] = stream
    splits = []
    for stream, run in itertools.groupby(streams):
        while len(splits) % 3 != stream:
            splits.append(0)
        splits.append(len(list(run)))
    while len(splits) % 3:
        splits.append(0)
    return splits


def _vision_module_class(family=None):
    return (family or FAMILY).hf_class("VisionModel")


def vision_config(vision_hf: dict, family=None):
    return (family or FAMILY).hf_class("VisionConfig")(**vision_hf)


def hf_config(arch):
    """The transformers config (Qwen3VLConfig, Qwen3VLMoeConfig) of an architecture (what get_rope_index
    reads)."""
    return arch.family.hf_class("Config")(**arch.family.write_hf(arch.plain(), "float32"))


def tower_features(module, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                   **_unused):
    """(main [N, lm_hidden], DeepStack [k x [N, lm_hidden]]): the merged features of the micro-batch's images,
    then of its videos, as transformers' get_image_features / get_video_features compute them."""
    import torch

    outs = []
    if pixel_values is not None and pixel_values.numel():
        outs.append(module(pixel_values, grid_thw=image_grid_thw))
    if pixel_values_videos is not None and pixel_values_videos.numel():
        outs.append(module(pixel_values_videos, grid_thw=video_grid_thw))
    main = torch.cat([o.pooler_output for o in outs])
    deep = [torch.cat(parts) for parts in zip(*(o.deepstack_features for o in outs))]
    return main, deep


def _split_rope(text: dict, where: str):
    """(text config with default RoPE, mrope_section, mrope_interleaved or None)."""
    text, section, interleaved = dict(text), None, None
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        if isinstance(rope, dict):
            rope = dict(rope)
            section = rope.pop("mrope_section", section)
            interleaved = rope.pop("mrope_interleaved", interleaved)
            if rope.get("rope_type", rope.get("type")) in ("mrope", "default"):
                rope.pop("type", None)
                rope["rope_type"] = "default"
            text[key] = rope
    if section is None:
        raise DataError(where, None, "text_config.rope_parameters.mrope_section is missing: a Qwen3-VL language "
                                     "model rotates by three interleaved position streams (e.g. [24, 20, 20])")
    return text, [int(x) for x in section], interleaved


@dataclass(frozen=True)
class Qwen3VLFamily(Family):
    """The family spec of Qwen3-VL; the dense and MoE variants differ in the fields below (and the MoE one
    reads its router keys through ``hf_read``, given the text_config)."""

    text_family: str = "qwen3"  # the language model's family (its decoder traits, config keys and weight table)
    hf_classes: str = "Qwen3VL"  # transformers' <prefix>Model, Config, VisionModel and VisionConfig
    hf_text_type: str = "qwen3_vl_text"  # text_config.model_type

    def hf_class(self, suffix: str):
        import transformers

        return getattr(transformers, self.hf_classes + suffix)

    def read_hf(self, hf: dict, folder: str) -> dict:
        from megatron_swift.models import families

        where = os.path.join(folder, "config.json")
        text = dict(hf.get("text_config") or {})
        text, section, interleaved = _split_rope(text, where)
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        if 2 * sum(section) != head_dim:
            raise DataError(where, None, f"mrope_section={section} must sum to half the head dimension ({head_dim})")
        text["tie_word_embeddings"] = hf.get("tie_word_embeddings", False)
        fields = families.get(self.text_family).read_hf(text, folder)
        if self.hf_read is not None:
            fields.update(self.hf_read(text, where))
        vision = dict(hf.get("vision_config") or {})
        vision.pop("transformers_version", None)
        options = dict(mrope_section=section, **{k: hf[k] for k in _TOKENS if k in hf})
        if interleaved is not None:
            options["mrope_interleaved"] = interleaved
        fields.update(text_family=self.text_family, vision_hf=vision, image_token_id=hf.get("image_token_id", 151655),
                      family_options=options)
        return fields

    def write_hf(self, arch: dict, dtype: str) -> dict:
        from megatron_swift.models import families

        options = arch["family_options"]
        text = families.get(self.text_family).write_hf(arch, dtype)
        for key in ("architectures", "torch_dtype", "dtype", "tie_word_embeddings"):
            text.pop(key, None)
        rope = text.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
        text.pop("rope_theta", None)
        rope = dict(rope, mrope_section=list(options["mrope_section"]))
        if "mrope_interleaved" in options:
            rope["mrope_interleaved"] = options["mrope_interleaved"]
        text.update(model_type=self.hf_text_type, rope_parameters=rope)
        return dict(architectures=list(self.hf_architectures[:1]), model_type=self.hf_model_type, text_config=text,
                    vision_config=dict(arch["vision_hf"]), image_token_id=arch["image_token_id"],
                    **{k: options[k] for k in _TOKENS if k in options},
                    tie_word_embeddings=not arch["untie_embeddings"], dtype=dtype)

    def transformer_fields(self, arch) -> dict:
        head_dim = arch.kv_channels or arch.hidden_size // arch.num_attention_heads
        return {"mrope_section": megatron_mrope_splits(arch.family_options["mrope_section"], head_dim // 2)}

    def layout_problems(self, arch, parallel) -> list:
        chunks = parallel.pp * (getattr(parallel, "vpp", None) or 1)
        count = len(arch.vision_hf.get("deepstack_visual_indexes") or ())
        if chunks > 1 and arch.num_layers // chunks < count:
            return [f"parallel.pp={parallel.pp}: DeepStack adds vision features after the first {count} decoder "
                    f"layers, which must all be on the first pipeline chunk (it has {arch.num_layers // chunks}); "
                    "use fewer pipeline stages"]
        return []

    def build(self, arch, tconfig, padded_vocab: int, seq_length: int, backend, unfuse_norms: bool = False):
        from megatron_swift.models.deepstack import DeepStack
        from megatron_swift.models.held_tower import build_held_tower
        from megatron_swift.models.vlm import build_held_vlm_chunks

        count = len(arch.vision_hf.get("deepstack_visual_indexes") or ())
        if count and tconfig.recompute_granularity == "full":
            raise ValueError("train.recompute=full: DeepStack's hooks (models/deepstack.py) would rerun with another "
                             "micro-batch's features; use train.recompute=selective or none for "
                             f"+model={self.name}")
        cls, config = _vision_module_class(self), vision_config(arch.vision_hf, self)

        def tower():
            return build_held_tower(lambda attn: cls._from_config(config, attn_implementation=attn),
                                    tower_features, backend.attention, backend.torch_device)

        chunks = build_held_vlm_chunks(arch, tconfig, padded_vocab, seq_length, backend, tower, unfuse_norms,
                                       _FREEZE_GROUPS)
        for chunk in chunks:
            if chunk.vision_model is not None:
                chunk.deepstack = DeepStack(list(chunk.language_model.decoder.layers), count,
                                            tconfig.sequence_parallel)
        return chunks

    def rules(self, arch) -> list:
        # transformers 5 keeps a MoE layer's experts as two stacked tensors (convert/rules.StackedExperts)
        stacked = {"stacked_experts": (arch.num_experts, arch.hidden_size)} if arch.is_moe else {}
        text = arch.decoder_family.weights(tied=not arch.untie_embeddings, head=arch.head, **stacked)
        return prefixed(text, "language_model.", {"model.": "model.language_model."}) + [
            Direct((_MTOWER + name,), _TOWER + name) for name in tower_parameter_names(arch.vision_hf, self)]

    def check_inputs(self, folder: str, hf: dict, images: list, seq: int, generator) -> dict:
        return check_inputs(folder, hf, images, seq, generator, self.hf_classes + "Model",
                            self.hf_classes + "Config")

    def tower_params(self, arch) -> dict:
        """From the vision_config alone: the patch convolution (with bias) and the learned position table, per
        block two LayerNorms, QKV and output projections and a plain MLP, all with biases; the merger (a LayerNorm
        over the tower width, then 4h -> 4h -> out) and the DeepStack mergers (their LayerNorm over 4h) are the
        projector."""
        v = arch.vision_hf
        h, f, patch, out = v["hidden_size"], v["intermediate_size"], v.get("patch_size", 16), v["out_hidden_size"]
        wide = v.get("spatial_merge_size", 2) ** 2 * h
        embed = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * patch ** 2 * h + h
        embed += v.get("num_position_embeddings", 2304) * h
        block = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        linears = (wide * wide + wide) + (wide * out + out)
        deep = len(v.get("deepstack_visual_indexes") or ())
        return {"encoder": embed + v["depth"] * block, "projector": 2 * h + linears + deep * (2 * wide + linears)}

    def tower_flops_per_token(self, arch, train_vision: bool, image_tokens: Optional[int] = None) -> float:
        """Per LLM image token (merge^2 patches): patch embedding, the blocks (QKV + output 4h^2, MLP 2hf, and
        scores and values 2h x the image's P = image_tokens x merge^2 patches: every block attends over the
        whole image; without ``image_tokens`` not counted, a lower bound), the merger and the DeepStack mergers
        (4h -> 4h -> out each). Training 3x the forward, the tower 1x when frozen; the mergers always train."""
        v = arch.vision_hf
        h, f, depth = v["hidden_size"], v["intermediate_size"], v["depth"]
        merge, patch, out = v.get("spatial_merge_size", 2), v.get("patch_size", 16), v["out_hidden_size"]
        patches = merge ** 2
        embed = v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * patch ** 2 * h
        keys = (image_tokens or 0) * patches
        tower = patches * (embed + depth * (4 * h * h + 2 * h * f + 2 * h * keys))
        mergers = (1 + len(v.get("deepstack_visual_indexes") or ())) * ((patches * h) ** 2 + patches * h * out)
        return 2 * ((3 if train_vision else 1) * tower + 3 * mergers)

    def tower_image_grid(self, arch, max_pixels: Optional[int], max_tokens: Optional[int] = None):
        """The largest image under ``max_pixels`` (None: the published processor's 16777216) and ``max_tokens``,
        as for Qwen2.5-VL with 16-px patches."""
        from megatron_swift.models.families.qwen2_5_vl import largest_grid

        v = arch.vision_hf
        merge = v.get("spatial_merge_size", 2)
        return largest_grid(max_pixels or _MAX_PIXELS, v.get("patch_size", 16) * merge, merge, max_tokens)

    def tower_image_tokens(self, arch, grid) -> int:
        """t x h x w patches, merge^2 to a token."""
        t, h, w = grid
        return t * h * w // arch.vision_hf.get("spatial_merge_size", 2) ** 2

    def tower_activation_bytes(self, arch, grids, train_tower: bool, train_merger: bool, eager: bool,
                               dtype_bytes: int) -> int:
        """Bytes autograd keeps for one micro-batch's images through transformers' Qwen3-VL tower (P patches, N
        tokens, d the compute dtype's bytes; a LayerNorm keeps its input and its mean and 1/std per row in d):

        - a trained tower: the pixels (P x 3 x 2 x 16^2 x d), the position table's bilinear indices and weights
          (32P + 16P), cos and sin (2 x 4 P x head_dim); per block its LayerNorms' inputs and outputs and
          statistics (4 P h d + 4 P d), QKV's output (3 P h d), rotated Q and K (2 P h d), the output
          projection's input (P h d), the MLP's GELU input and output (2 P f d), and the attention: eager keeps
          each image's fp32 softmax (heads x P_i^2, and its copy in d when d is not fp32), SDPA its output and
          log-sum-exp (P h d + 4 heads P);
        - each merger (the main one over P rows of h, the DeepStack ones over N rows of 4h): its LayerNorm's
          statistics and GELU's input, plus (trained) the LayerNorm's output and GELU's output (P h d each);
          the main one's input (the last block's output) too, a DeepStack one's only when the tower is
          frozen and no other merger keeps that block's output."""
        v = arch.vision_hf
        h, f, heads, depth = v["hidden_size"], v["intermediate_size"], v["num_heads"], v["depth"]
        merge, d = v.get("spatial_merge_size", 2), dtype_bytes
        grids = [tuple(int(x) for x in g) for g in grids]
        P = sum(t * gh * gw for t, gh, gw in grids)
        N = P // merge ** 2
        deep = sorted(set(v.get("deepstack_visual_indexes") or ()))
        if not (train_tower or train_merger):
            return 0
        kept = (3 if train_merger else 1) * P * h * d
        mergers = P * h * d + 2 * P * d + kept + len(deep) * (2 * N * d + kept)
        if not train_tower:  # a DeepStack merger's input is kept by it alone (unless it is the last block's)
            return mergers + sum(P * h * d for k in deep if k != depth - 1)
        pixels = P * v.get("in_channels", 3) * v.get("temporal_patch_size", 2) * v.get("patch_size", 16) ** 2 * d
        shared = pixels + 48 * P + 2 * 4 * P * (h // heads)
        block = 10 * P * h * d + 4 * P * d + 2 * P * f * d
        if eager:
            attention = heads * (4 + (d if d != 4 else 0)) * sum(t * (gh * gw) ** 2 for t, gh, gw in grids)
        else:
            attention = P * h * d + 4 * heads * P
        return shared + depth * (block + attention) + mergers

    def vision_data(self, cfg, arch):
        # without a folder: the published Qwen3-VL preprocessor_config.json (16-px patches, mean/std 0.5,
        # 256x256 to 4096x4096 pixels)
        v = arch.vision_hf
        defaults = dict(patch_size=v.get("patch_size", 16), merge_size=v.get("spatial_merge_size", 2),
                        temporal_patch_size=v.get("temporal_patch_size", 2), image_mean=[0.5] * 3,
                        image_std=[0.5] * 3, min_pixels=65536, max_pixels=_MAX_PIXELS)
        return qwen3_vision_data(folder_image_processor(cfg, self.name, defaults), arch)


def qwen3_vision_data(processor, arch):
    """VisionData over the folder's Qwen2-VL-style image processor (16-px patches for Qwen3-VL), positions from
    the family's transformers model's get_rope_index."""
    return qwen_vision_data(processor, arch, arch.family.hf_classes + "Model", hf_config(arch))


def tower_parameter_names(vision_hf: dict, family=None) -> list:
    """The tower's parameter names, read off the module built on the meta device."""
    import torch

    with torch.device("meta"):
        module = _vision_module_class(family)._from_config(vision_config(vision_hf, family))
    return [name for name, _ in module.named_parameters()]


# Published configs (Qwen/Qwen3-VL-*-Instruct config.json): 16-px patches, 48x48 learned positions
# (families/qwen3_vl_moe.py uses the same towers).
_VISION = dict(hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
               in_channels=3, num_position_embeddings=2304, model_type="qwen3_vl_vision")
_SMALL_TOWER = dict(_VISION, depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                    deepstack_visual_indexes=[5, 11, 17])
_LARGE_TOWER = dict(_VISION, depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                    deepstack_visual_indexes=[8, 16, 24])
_OPTIONS = dict(mrope_section=[24, 20, 20], mrope_interleaved=True, video_token_id=151656,
                vision_start_token_id=151652, vision_end_token_id=151653)
_Q = dict(kv_channels=128, vocab_size=151936, max_position_embeddings=262144, rotary_base=5e6, norm_epsilon=1e-6,
          text_family="qwen3", image_token_id=151655, family_options=_OPTIONS)

FAMILY = Qwen3VLFamily(
    name="qwen3_vl",
    hf_architectures=("Qwen3VLForConditionalGeneration",),
    hf_model_type="qwen3_vl",
    layers_prefix="language_model.decoder.layers.",
    sizes={
        # CPU-sized: a 4-layer Qwen3 decoder (head dim 16: sections [2, 3, 3] interleaved) and a 3-block tower
        # feeding DeepStack from blocks 0 and 2 into decoder layers 0 and 1 (both on the first stage at PP=2).
        "tiny": QwenVLSize(4, 64, 128, 4, 2, kv_channels=16, vocab_size=300, max_position_embeddings=1024,
                           untie_embeddings=True, text_family="qwen3", image_token_id=290,
                           vision_hf=dict(_VISION, depth=3, hidden_size=32, intermediate_size=64, num_heads=4,
                                          num_position_embeddings=64, deepstack_visual_indexes=[0, 2],
                                          out_hidden_size=64),
                           family_options=dict(mrope_section=[2, 3, 3], mrope_interleaved=True, video_token_id=291,
                                               vision_start_token_id=292, vision_end_token_id=293)),
        "2b": QwenVLSize(28, 2048, 6144, 16, 8, untie_embeddings=False,
                         vision_hf=dict(_SMALL_TOWER, out_hidden_size=2048), **_Q),
        "4b": QwenVLSize(36, 2560, 9728, 32, 8, untie_embeddings=False,
                         vision_hf=dict(_SMALL_TOWER, out_hidden_size=2560), **_Q),
        "8b": QwenVLSize(36, 4096, 12288, 32, 8, vision_hf=dict(_LARGE_TOWER, out_hidden_size=4096), **_Q),
        "32b": QwenVLSize(64, 5120, 25600, 64, 8, vision_hf=dict(_LARGE_TOWER, out_hidden_size=5120), **_Q),
    },
)
