"""LLaVA: a CLIP or SigLIP vision encoder, an MLP projector and a language model of any text family
(HF ``LlavaForConditionalGeneration``; the module is models/vlm.py, the facts behind each choice are in
docs/design/vlm/README.md)."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Optional

from megatron_swift.convert.rules import Direct
from megatron_swift.convert.tables import prefixed, vit_style
from megatron_swift.data.errors import DataError
from megatron_swift.models.families.base import CompositionError, Family, Size
from megatron_swift.models.vision_arch import VisionArch, hf_vision_config, image_seq_length, vision_arch

# The canonical (transformers 4.x on-disk) spellings; 5.x writes the tower without "vision_model." and keeps
# "model." in front of everything in memory. The exporter writes these, which both releases read.
_TOWER, _LM, _PROJ = "vision_tower.vision_model.", "language_model.", "multi_modal_projector."
_ALIASES = (("model.vision_tower.vision_model.", _TOWER), ("model.vision_tower.", _TOWER),
            ("vision_tower.vision_model.", _TOWER), ("vision_tower.", _TOWER),
            ("model.language_model.", _LM + "model."), ("model.multi_modal_projector.", _PROJ),
            ("lm_head.", _LM + "lm_head."))


@dataclass(frozen=True)
class VLSize(Size):
    """A size of the language model plus its vision encoder and projector."""

    text_family: str = "qwen2"
    vision: Optional[VisionArch] = None
    image_token_id: Optional[int] = None  # None: one past the tokenizer's vocabulary (a token is added)
    vision_select: str = "default"
    projector_activation: str = "gelu"
    projector_bias: bool = True


@dataclass(frozen=True)
class LlavaFamily(Family):
    """The family spec of LLaVA-style VLMs: each hook of Family done for a nested HF config."""

    def read_hf(self, hf: dict, folder: str) -> dict:
        where = os.path.join(folder, "config.json")
        text, layer = hf.get("text_config") or {}, hf.get("vision_feature_layer", -2)
        select = hf.get("vision_feature_select_strategy", "default")
        if not isinstance(layer, int):
            raise DataError(where, None, f"vision_feature_layer={layer}: features concatenated from several "
                                         "layers are not supported (one layer index)")
        if select not in ("default", "full"):
            raise DataError(where, None, f"vision_feature_select_strategy={select!r} is not default or full")
        from megatron_swift.models import families

        try:
            text_family = families.by_hf_model_type(text.get("model_type", "llama"))
            vision = vision_arch(hf.get("vision_config") or {}, layer)
        except (KeyError, ValueError) as e:
            raise DataError(where, None, str(e).strip("'\"")) from None
        fields = text_family.read_hf(dict(text, tie_word_embeddings=text.get(
            "tie_word_embeddings", hf.get("tie_word_embeddings", False))), folder)
        fields.update(text_family=text_family.name, vision=vision, vision_select=select,
                      image_token_id=hf.get("image_token_id", hf.get("image_token_index")),
                      projector_activation=hf.get("projector_hidden_act", "gelu"),
                      projector_bias=hf.get("multimodal_projector_bias", True))
        expected = image_seq_length(vision, select)
        if hf.get("image_seq_length", expected) != expected:
            raise DataError(where, None, f"image_seq_length={hf['image_seq_length']} but the vision encoder "
                                         f"gives {expected} features per image")
        return fields

    def compose(self, model_cfg) -> dict:
        """An HF causal LM (model.llm) and an HF CLIP/SigLIP encoder (model.vision); the image token is added
        to the vocabulary when the data is read (models.vlm.add_image_token)."""
        from megatron_swift.convert.hf_config import read_hf_config
        from megatron_swift.models import families

        if not model_cfg.vision:
            raise CompositionError("model.llm needs model.vision: the HF folder of a CLIP or SigLIP vision encoder")
        llm = read_hf_config(model_cfg.llm)
        text_family = families.get(families.hf_family_name(llm, model_cfg.llm))
        fields = text_family.read_hf(llm, model_cfg.llm)
        vision_hf = read_hf_config(model_cfg.vision)
        vision_hf = vision_hf.get("vision_config", vision_hf)  # a whole CLIPModel / SiglipModel folder
        layer = -2 if model_cfg.vision_feature_layer is None else model_cfg.vision_feature_layer
        try:
            vision = vision_arch(vision_hf, layer)
        except ValueError as e:
            raise DataError(os.path.join(model_cfg.vision, "config.json"), None, str(e)) from None
        fields.update(text_family=text_family.name, vision=vision, image_token_id=None)
        return fields

    def write_hf(self, arch: dict, dtype: str) -> dict:
        """The tower as built: its feature layer becomes the last one (-1), SigLIP without its head."""
        from megatron_swift.models import families

        vision = VisionArch(**arch["vision"])
        text = families.get(arch["text_family"]).write_hf(arch, dtype)
        text.pop("architectures", None)
        return dict(architectures=list(self.hf_architectures), model_type=self.hf_model_type,
                    text_config=text, vision_config=hf_vision_config(vision),
                    image_token_index=arch["image_token_id"], image_seq_length=image_seq_length(
                        vision, arch["vision_select"]),
                    vision_feature_layer=-1, vision_feature_select_strategy=arch["vision_select"],
                    projector_hidden_act=arch["projector_activation"],
                    multimodal_projector_bias=arch["projector_bias"],
                    tie_word_embeddings=text.get("tie_word_embeddings", False), torch_dtype=dtype)

    def hf_fill(self, arch) -> dict:
        """The tower's final norm, which HF's encoder has and LLaVA never applies: an identity."""
        import torch

        h = arch.vision.hidden_size
        return {_TOWER + "post_layernorm.weight": torch.ones(h), _TOWER + "post_layernorm.bias": torch.zeros(h)}

    def export_assets(self, folder: str, model_cfg, arch: dict) -> None:
        """A VLM composed from model.llm and model.vision: the LLM's tokenizer and chat template with the image
        token added at its id, the encoder's image processor, and the LlavaProcessor settings."""
        from megatron_swift.convert.vlm_assets import write_vlm_assets

        if model_cfg.get("llm"):
            write_vlm_assets(folder, model_cfg.llm, model_cfg.vision, VisionArch(**arch["vision"]),
                             arch["image_token_id"], arch["vision_select"])

    def build(self, arch, tconfig, padded_vocab: int, seq_length: int, backend, unfuse_norms: bool = False):
        from megatron_swift.models.vlm import build_vlm_chunks

        return build_vlm_chunks(arch, tconfig, padded_vocab, seq_length, backend, unfuse_norms)

    def rules(self, arch) -> list:
        text = arch.decoder_family.weights(tied=not arch.untie_embeddings, head=arch.head)
        language = prefixed(text, "language_model.", {"model.": _LM + "model.", "lm_head.": _LM + "lm_head."})
        vision = prefixed(vit_style(arch.vision.model_type, _TOWER), "vision_model.", {})
        projector = [Direct((f"vision_projection.encoder.linear_fc{i}.{t}",), f"{_PROJ}linear_{i}.{t}")
                     for i in (1, 2) for t in (("weight", "bias") if arch.projector_bias else ("weight",))]
        return language + vision + projector

    def context(self, name: str, arch, dense):
        if name.startswith("vision_model."):  # Q/K/V fused per head: as many groups as heads
            v = arch.vision
            return dataclasses.replace(dense, num_query_groups=v.num_attention_heads, kv_channels=v.kv_channels,
                                       padded_vocab=0, vocab_size=0)
        return dense

    def canonical_hf_name(self, name: str) -> str:
        for alias, canonical in _ALIASES:
            if name.startswith(alias):
                return canonical + name[len(alias):]
        return name

    def hf_unused(self, arch, name: str) -> bool:
        """The tower's layers after the feature layer, its final norm and SigLIP's pooling head."""
        if not name.startswith(_TOWER):
            return False
        rest = name[len(_TOWER):]
        layer = re.match(r"encoder\.layers\.(\d+)\.", rest)
        return bool(layer and int(layer.group(1)) >= arch.vision.num_layers) or rest.startswith(
            ("post_layernorm.", "head."))


_TINY_CLIP = VisionArch("clip", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                        image_size=56, patch_size=14, norm_epsilon=1e-5, activation="quick_gelu", hf_num_layers=3)

FAMILY = LlavaFamily(
    name="llava",
    hf_architectures=("LlavaForConditionalGeneration",),
    hf_model_type="llava",
    hf_head=_LM + "lm_head.weight",
    layers_prefix="language_model.decoder.layers.",
    sizes={
        # CPU-sized: a 2-layer Qwen2-like decoder and a 2-of-3-layer CLIP tower on 56 x 56 images (16 tokens).
        "tiny": VLSize(2, 64, 128, 4, 2, max_position_embeddings=1024, untie_embeddings=False,
                       text_family="qwen2", vision=_TINY_CLIP),
    },
)
