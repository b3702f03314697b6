"""Vision encoders (CLIP ViT, SigLIP) on megatron-core's ``CLIPViTModel``: the first piece of LLaVA-style
VLMs (issue 17; the design and its verified facts: docs/design/vlm/README.md).

What it takes to reproduce transformers' ``CLIPVisionModel`` / ``SiglipVisionModel`` features, as a VLM reads
them (``hidden_states[feature_layer]``), with megatron-core 0.16:

- only the layers up to the feature layer are built (HF LLaVA reads layer -2 of CLIP by default);
- the encoder attends bidirectionally: megatron-core's local ViT spec declares a causal mask;
- no final layernorm: those hidden states are taken before it (SigLIP's ``post_layernorm`` and head
  are not used by a VLM);
- ``ln_pre`` (CLIP only) is a megatron norm: ``CLIPViTModel``'s default without Transformer Engine is
  ``torch.nn.LayerNorm``, which its constructor cannot build (it passes ``config=``);
- activations: CLIP's quick_gelu, SigLIP's tanh-approximated GELU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_swift.models.attention import use_core_attention

_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                "gelu": F.gelu}


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


def vision_config(arch: VisionArch, **common) -> TransformerConfig:
    """The encoder's TransformerConfig; ``common``: the run's precision/init settings (params_dtype, ...)."""
    if arch.activation not in _ACTIVATIONS:
        raise ValueError(f"vision activation {arch.activation!r} is not one of {sorted(_ACTIVATIONS)}")
    config = TransformerConfig(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads, kv_channels=arch.kv_channels,
        normalization="LayerNorm", layernorm_epsilon=arch.norm_epsilon, gated_linear_unit=False,
        activation_func=_ACTIVATIONS[arch.activation], add_bias_linear=True, add_qkv_bias=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0, **common)
    config.vision_model_type = arch.model_type  # what CLIPViTModel reads for SigLIP's details
    return config


def build_vision_model(arch: VisionArch, config: TransformerConfig, attention: str = "sdpa") -> CLIPViTModel:
    """The encoder (whole on one pipeline stage), its core attention from the attention seam, unmasked."""
    spec = get_vit_layer_with_local_spec()
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    use_core_attention(spec, attention)
    return CLIPViTModel(config, spec, ln_pre_impl=WrappedTorchNorm if arch.class_token else IdentityOp,
                        ln_post_impl=IdentityOp, add_class_token=arch.class_token,
                        class_token_len=1 if arch.class_token else 0,
                        patch_dim=arch.patch_size, img_h=arch.image_size, img_w=arch.image_size,
                        model_subtype=arch.model_type)


def features(model: CLIPViTModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """[images, tokens (class token first for CLIP), hidden]: what HF's hidden_states[feature_layer] holds."""
    return model(pixel_values)
