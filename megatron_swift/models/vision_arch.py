"""A vision encoder's numbers (``VisionArch``) and their HF config, apart from the megatron-core model
(models/vision.py): config reading, validation, FLOPs and the data pipeline need these without importing
torch or megatron-core."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionArch:
    """A vision encoder's numbers, from an HF ``vision_config``."""

    model_type: str  # clip | siglip
    num_layers: int  # built: the layers up to the feature layer
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    norm_epsilon: float
    activation: str
    hf_num_layers: int = 0  # layers of the HF tower (0: as many as built); those past num_layers go unused

    @property
    def class_token(self) -> bool:
        return self.model_type == "clip"

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def encoder_tokens(self) -> int:
        """Positions the encoder runs over per image: its patches, and CLIP's class token."""
        return self.patches + int(self.class_token)


def vision_arch(hf_vision: dict, feature_layer: int = -1) -> VisionArch:
    """``hf_vision``: an HF CLIP/SigLIP vision config (dict); ``feature_layer`` indexes HF's hidden_states
    (0: the embeddings, k: after k layers, negative from the end)."""
    model_type = hf_vision.get("model_type", "").replace("_vision_model", "")
    if model_type not in ("clip", "siglip"):
        raise ValueError(f"vision model_type {hf_vision.get('model_type')!r} is not clip or siglip")
    total = hf_vision["num_hidden_layers"]
    used = total + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= used <= total:
        raise ValueError(f"vision feature layer {feature_layer} is outside the encoder's {total} layers")
    return VisionArch(model_type, used, hf_vision["hidden_size"], hf_vision["intermediate_size"],
                      hf_vision["num_attention_heads"], hf_vision["image_size"], hf_vision["patch_size"],
                      hf_vision.get("layer_norm_eps", 1e-5), hf_vision.get("hidden_act", "quick_gelu"), total)


def hf_vision_config(arch: VisionArch) -> dict:
    """An HF ``vision_config`` for the tower as built (its feature layer is then the last: -1)."""
    return dict(model_type=f"{arch.model_type}_vision_model", num_hidden_layers=arch.num_layers,
                hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
                num_attention_heads=arch.num_attention_heads, image_size=arch.image_size,
                patch_size=arch.patch_size, layer_norm_eps=arch.norm_epsilon, hidden_act=arch.activation,
                **({"vision_use_head": False} if arch.model_type == "siglip" else {}))


def image_seq_length(arch: VisionArch, select: str) -> int:
    """Image tokens per image: one per patch, plus CLIP's class token when all features are kept (``full``)."""
    return arch.patches + (1 if arch.class_token and select == "full" else 0)
