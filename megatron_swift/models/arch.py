"""Resolve a model config against its family's size table into concrete numbers."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from megatron_swift.models import families
from megatron_swift.models.families import Family
from megatron_swift.models.families.base import moe_layer_pattern
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
    qkv_bias: Optional[bool] = None  # None: the family's trait (uses_qkv_bias)
    qk_norm: Optional[bool] = None  # None: the family's trait (uses_qk_norm)
    # MoE layout and router (families/base.Size documents each; the defaults describe Qwen3-MoE).
    moe_shared_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    moe_score_function: str = "softmax"
    moe_expert_bias: bool = False
    moe_topk_scaling_factor: Optional[float] = None
    moe_num_groups: Optional[int] = None
    moe_group_topk: Optional[int] = None
    moe_dense_first: int = 0
    moe_sparse_step: int = 1
    moe_dense_layers: Tuple[int, ...] = ()
    family_options: Optional[dict] = None  # numbers only this family has (families.base.Size.family_options)
    mtp_num_layers: int = 0  # multi-token-prediction layers built after the decoder (families.base.Size)
    head: str = "lm"  # output layer: "lm" (vocabulary logits) or "reward" (one scalar; task=rm)
    # Vision-language models (families/llava.py): the fields above describe the language model.
    text_family: Optional[str] = None  # the language model's family (its decoder traits and weight table)
    vision: Optional[VisionArch] = None  # the vision encoder, as built
    image_token_id: Optional[int] = None  # the token whose positions receive image features
    vision_select: str = "default"  # HF vision_feature_select_strategy: default drops CLIP's class token
    projector_activation: str = "gelu"  # between the projector's two linears (HF projector_hidden_act)
    projector_bias: bool = True  # biases on the projector's linears (HF multimodal_projector_bias)
    # A tower held as the transformers module (models/held_tower.py; Qwen2.5-VL, InternVL): its HF vision_config
    # as read (the family builds the module from it); None: none, or a megatron-core tower (``vision``).
    vision_hf: Optional[dict] = None

    def __post_init__(self):
        if isinstance(self.vision, dict):  # from a checkpoint's stored numbers (plain())
            object.__setattr__(self, "vision", VisionArch(**self.vision))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "moe_dense_layers", tuple(self.moe_dense_layers or ()))  # a list from JSON

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def uses_qkv_bias(self) -> bool:
        """Biases on the Q/K/V projections: this checkpoint's, else the decoder family's trait."""
        return self.decoder_family.add_qkv_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def uses_qk_norm(self) -> bool:
        """Per-head RMSNorm on queries and keys: this checkpoint's, else the decoder family's trait."""
        return self.decoder_family.qk_layernorm if self.qk_norm is None else self.qk_norm

    @property
    def moe_layer_pattern(self) -> Optional[list]:
        """Per layer 1 (routed experts) or 0 (dense MLP); None when every layer is the same kind."""
        pattern = moe_layer_pattern(self) if self.is_moe else None
        return pattern if pattern and not all(pattern) else None

    @property
    def moe_layers(self) -> int:
        """How many layers have routed experts."""
        return sum(moe_layer_pattern(self)) if self.is_moe else 0

    @property
    def has_vision(self) -> bool:
        """A vision-language model: a megatron-core tower (``vision``) or a held transformers one (``vision_hf``)."""
        return self.vision is not None or self.vision_hf is not None

    @property
    def decoder_family(self) -> Family:
        """The family whose decoder layers the language model has (itself, or a VLM's text family)."""
        return families.get(self.text_family) if self.text_family else self.family

    def plain(self) -> dict:
        """Every field but the family as JSON-able values (stored with checkpoints; Arch(family=..., **plain)).
        A text model leaves out the vision fields, a model with default full RoPE the RoPE fields and one without
        family options those, so its record equals one written before they existed."""
        skip = {"family"} | (set() if self.has_vision else set(_VLM_FIELDS))
        skip |= {name for name, default in _OPTIONAL_DEFAULTS.items() if getattr(self, name) == default}
        return {f.name: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                for f in dataclasses.fields(self) if f.name not in skip for v in [getattr(self, f.name)]}


# Fields a record leaves out at their default (the record of a model without them equals one written before
# they existed): RoPE beyond the base, and the MoE axes beyond routed experts in every layer.
_OPTIONAL_DEFAULTS = {"rotary_percent": 1.0, "rope_scaling": None, "qkv_bias": None, "qk_norm": None,
                      "moe_shared_ffn_hidden_size": None,
                      "moe_shared_expert_gate": False, "moe_score_function": "softmax", "moe_expert_bias": False,
                      "moe_topk_scaling_factor": None, "moe_num_groups": None, "moe_group_topk": None,
                      "moe_dense_first": 0, "moe_sparse_step": 1, "moe_dense_layers": (),
                      "family_options": None, "mtp_num_layers": 0, "vision_hf": None}
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
