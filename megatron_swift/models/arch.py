"""Resolve a model config against its family's size table into concrete numbers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_swift.models import families
from megatron_swift.models.families import Family
from megatron_swift.models.rope import RopeScaling
from megatron_swift.models.vision_arch import VisionArch


@dataclass(frozen=True)
class Arch:
    """Every architecture number a run needs, after size table and overrides are merged."""

    family: Family
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: Optional[int]
    max_position_embeddings: int
    rotary_base: float
    norm_epsilon: float
    untie_embeddings: bool
    num_experts: Optional[int]
    moe_ffn_hidden_size: Optional[int]
    moe_router_topk: Optional[int]
    moe_router_pre_softmax: bool = False  # default: checkpoints written before this field existed
    # RoPE beyond rotary_base (models/rope.py): rotated fraction of each head (HF partial_rotary_factor) and the
    # HF rope_scaling as written (None: default RoPE).
    rotary_percent: float = 1.0
    rope_scaling: Optional[RopeScaling] = None
    family_options: Optional[dict] = None  # numbers only this family has (families.base.Size.family_options)
    head: str = "lm"  # output layer: "lm" (vocabulary logits) or "reward" (one scalar; task=rm)
    # Vision-language models (families/llava.py): the fields above describe the language model.
    text_family: Optional[str] = None  # the language model's family (its decoder traits and weight table)
    vision: Optional[VisionArch] = None  # the vision encoder, as built
    image_token_id: Optional[int] = None  # the token whose positions receive image features
    vision_select: str = "default"  # HF vision_feature_select_strategy: default drops CLIP's class token
    projector_activation: str = "gelu"  # between the projector's two linears (HF projector_hidden_act)
    projector_bias: bool = True  # biases on the projector's linears (HF multimodal_projector_bias)

    def __post_init__(self):
        if isinstance(self.vision, dict):  # from a checkpoint's stored numbers (plain())
            object.__setattr__(self, "vision", VisionArch(**self.vision))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def decoder_family(self) -> Family:
        """The family whose decoder layers the language model has (itself, or a VLM's text family)."""
        return families.get(self.text_family) if self.text_family else self.family

    def plain(self) -> dict:
        """Every field but the family as JSON-able values (stored with checkpoints; Arch(family=..., **plain)).
        A text model leaves out the vision fields, a model with default full RoPE the RoPE fields and one without
        family options those, so its record equals one written before they existed."""
        skip = {"family"} | (set() if self.vision else set(_VLM_FIELDS))
        skip |= {name for name, default in _OMITTED_AT_DEFAULT.items() if getattr(self, name) == default}
        return {f.name: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                for f in dataclasses.fields(self) if f.name not in skip for v in [getattr(self, f.name)]}


# Left out of plain() at these values, so that a record equals one written before the field existed.
_OMITTED_AT_DEFAULT = {"rotary_percent": 1.0, "rope_scaling": None, "family_options": None}
_VLM_FIELDS = ("text_family", "vision", "image_token_id", "vision_select", "projector_activation", "projector_bias")


def resolve(model_cfg) -> Arch:
    """Apply the non-None fields of ``model_cfg`` on top of its family's named size."""
    family = families.get(model_cfg.family)
    base = dataclasses.asdict(family.size(model_cfg.size))
    if model_cfg.pretrained:
        base.update(_from_hf(model_cfg.pretrained, family))
    elif getattr(model_cfg, "llm", None):  # a VLM composed of an HF LLM and an HF vision encoder
        base.update(family.compose(model_cfg))
    values = {}
    for name, default in base.items():
        # model.vision names the encoder's folder (model.llm's companion), not these numbers.
        override = None if name == "vision" else getattr(model_cfg, name, None)
        values[name] = override if override is not None else default
    if values["kv_channels"] is None:
        values["kv_channels"] = values["hidden_size"] // values["num_attention_heads"]
    return Arch(family=family, **values)


def _from_hf(folder: str, family: Family) -> dict:
    """Architecture numbers from an HF config.json; its architecture must belong to ``family``."""
    from megatron_swift.convert.hf_config import read_hf_config

    hf = read_hf_config(folder)
    archs = hf.get("architectures") or []
    owners = {families.by_hf_architecture(a).name for a in archs if a in families.hf_architectures()}
    if family.name not in owners:
        raise KeyError(f"model.pretrained={folder} is a {archs or 'model without architectures'}, "
                       f"which +model={family.name} does not load; supported: {', '.join(family.hf_architectures)}"
                       + (f" (use +model={sorted(owners)[0]})" if owners else ""))
    return family.read_hf(hf, folder)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary so each TP rank holds an equal, aligned slice."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple
