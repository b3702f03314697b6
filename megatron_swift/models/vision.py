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
from megatron_swift.models.vision_arch import (VisionArch, hf_vision_config, image_seq_length,  # noqa: F401
                                               vision_arch)

_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                "gelu": F.gelu}


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
