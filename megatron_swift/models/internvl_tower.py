"""InternVL's vision side as transformers holds it: InternViT (``vision_tower``), pixel shuffle and the MLP
projector (``multi_modal_projector``), without the language model; held whole on each TP rank of the first
pipeline stage (models/held_tower.py).

Its features are transformers' own ``InternVLModel.get_image_features`` run on this module (it has the
attributes that method reads: ``config``, ``dtype``, the two submodules and ``pixel_shuffle``), so the tower,
the feature layer, the class-token drop, the pixel shuffle and the projector are transformers' code.
"""
from __future__ import annotations

import torch


class InternVLTower(torch.nn.Module):
    """``config``: a transformers InternVLConfig; parameter names are the HF ones below ``model.``."""

    def __init__(self, config, attn_implementation: str):
        super().__init__()
        import transformers
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

        self.config = config
        self.vision_tower = transformers.AutoModel.from_config(config.vision_config,
                                                               attn_implementation=attn_implementation)
        self.multi_modal_projector = InternVLMultiModalProjector(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    def pixel_shuffle(self, features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        import transformers

        return transformers.InternVLModel.pixel_shuffle(self, features, scale_factor)


def internvl_features(tower: InternVLTower, pixel_values: torch.Tensor) -> torch.Tensor:
    """[tiles * tokens per tile, LM hidden]: every tile's features, tile after tile (the order transformers fills
    the image tokens in)."""
    import transformers

    out = transformers.InternVLModel.get_image_features(tower, pixel_values=pixel_values, return_dict=True)
    return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])


def build_internvl_tower(hf_config: dict, attn_implementation: str) -> InternVLTower:
    """The tower of an HF InternVL config.json (as a dict)."""
    import transformers

    return InternVLTower(transformers.InternVLConfig.from_dict(hf_config), attn_implementation)
