"""Rotary position embeddings as Hugging Face configs describe them: default, ``linear``, ``llama3`` and ``yarn``
frequencies, YaRN's attention factor, partial rotary.

Partial rotary (``partial_rotary_factor``, read at the top level or in ``rope_parameters``) rotates the first
``int(head_dim * factor)`` features of each head, in halves, as transformers' GLM-4.5 / Phi-3 / NeoX code does;
transformers' own Llama / Qwen2 / Qwen3 classes ignore the key for default RoPE (and fail for scaled types), so a
checkpoint of those families with it set loads here as a partial-rotary model.

The HF config is read by a table (``_KEYS``: the keys of ``rope_scaling`` / ``rope_parameters`` each RoPE type
reads) into a :class:`RopeScaling` kept as written, so an export writes the same keys back. The frequencies and the
attention factor are computed here with transformers' formulas (``transformers.modeling_rope_utils``; the
tests compare them with transformers' own functions), in float32 as transformers does.

:func:`install` is the one place where megatron-core's RoPE is worked around (megatron-core 0.16.1):

* ``GPTModel(rope_scaling=True)`` passes only the factor to ``RotaryEmbedding._apply_scaling``, which fixes
  ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings`` at Llama 3.1's 1, 4 and
  8192, and has no ``linear`` type except by position interpolation (other rounding);
* ``position_embedding_type='yarn'`` (``YarnRotaryEmbedding``) computes its frequencies over the whole head
  even with ``rotary_percent < 1``, has no ``truncate`` and no explicit ``attention_factor``, and raises
  NotImplementedError under ``config.flash_decode``, which the rollout engine uses (rollout/rotated_cache.py).

So every model is built with ``position_embedding_type='rope'`` (``rotary_percent`` for partial rotary, which
megatron-core does as transformers does), and a scaled one has its ``rotary_pos_emb`` replaced by a
:class:`HFRotaryEmbedding` holding transformers' inverse frequencies; training, packed sequences and context
parallelism take the angles from it through megatron-core's own ``RotaryEmbedding.forward``, and the rollout
engine's cos/sin through its ``get_cos_sin``, which multiplies them by the attention factor. During training
megatron-core's attention multiplies cos/sin by ``_yarn_get_concentration_factor_from_config(config)``, which
is read from ``config.yarn_rotary_scaling_factor`` / ``yarn_mscale`` / ``yarn_mscale_all_dim``: install() sets
those three so that megatron-core's formula gives transformers' attention factor (see :func:`_concentration`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

# The keys of an HF rope dict that each supported RoPE type reads (besides rope_type/type, rope_theta and
# partial_rotary_factor, which every type reads); a key of a supported type's dict not listed is refused.
_KEYS: Dict[str, Tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"),
}
_REQUIRED: Dict[str, Tuple[str, ...]] = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor",
                                                                            "high_freq_factor")}
_COMMON = ("rope_type", "type", "rope_theta", "partial_rotary_factor")
SUPPORTED = tuple(_KEYS)


class RopeError(ValueError):
    """An HF RoPE setting this trainer does not build; the message names the key (one line)."""


@dataclass(frozen=True)
class RopeScaling:
    """An HF ``rope_scaling`` / ``rope_parameters`` entry as written (None: the key was absent)."""

    rope_type: str
    factor: Optional[float] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    attention_factor: Optional[float] = None
    truncate: Optional[bool] = None

    def hf(self) -> dict:
        """The HF dict again (the keys that were written, under ``rope_type``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def read_hf_rope(hf: dict) -> Tuple[float, float, Optional[RopeScaling]]:
    """(rope_theta, partial rotary factor, scaling or None for default RoPE) from an HF config dict, in either
    spelling: transformers 4.x (``rope_theta``, ``partial_rotary_factor`` and ``rope_scaling`` at the top level)
    or 5.x (all of them in ``rope_parameters``). Raises RopeError naming the key when the type is not supported."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = dict(hf.get(key) or {})  # transformers 5 reads rope_scaling first when both are given
    if any(isinstance(v, dict) for v in rope.values()):
        raise RopeError(f"{key}: RoPE parameters per layer type ({', '.join(rope)}) are not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    type_key = f"{key}.{'rope_type' if 'rope_type' in rope else 'type'}"
    if kind not in _KEYS:
        raise RopeError(f"{type_key}={kind!r} is not supported; supported RoPE types: {', '.join(SUPPORTED)}")
    unknown = sorted(set(rope) - set(_COMMON) - set(_KEYS[kind]))
    if unknown:
        raise RopeError(f"{key}.{unknown[0]}: not a {kind} RoPE parameter this trainer reads "
                        f"({kind} reads: {', '.join(_KEYS[kind]) or 'none'})")
    missing = [k for k in _REQUIRED.get(kind, ()) if rope.get(k) is None]
    if missing:
        raise RopeError(f"{key}.{missing[0]} is missing ({kind} RoPE needs {', '.join(_REQUIRED[kind])})")
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0))
    if not 0.0 < partial <= 1.0:
        raise RopeError(f"partial_rotary_factor={partial}: must be in (0, 1]")
    if kind == "default":
        return theta, partial, None
    fields = {k: rope[k] for k in _KEYS[kind] if rope.get(k) is not None}
    # transformers gives a top-level original_max_position_embeddings (Phi-3's spelling) priority.
    if kind in ("llama3", "yarn") and hf.get("original_max_position_embeddings") is not None:
        fields["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    return theta, partial, RopeScaling(rope_type=kind, **fields)


def write_hf_rope(config: dict, theta: float, partial: float, scaling: Optional[RopeScaling]) -> None:
    """The RoPE keys of an HF config.json in the spelling both transformers 4.x and 5.x read."""
    config["rope_theta"] = theta
    if scaling is not None:
        config["rope_scaling"] = scaling.hf()
    if partial != 1.0:
        config["partial_rotary_factor"] = partial


def rotary_dim(kv_channels: int, partial: float) -> int:
    """Rotated features per head (transformers' and megatron-core's int(head_dim * partial_rotary_factor))."""
    return int(kv_channels * partial)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(scaling: Optional[RopeScaling], dim: int, base: float,
             max_position_embeddings: int) -> Tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2] float32, attention factor) as transformers computes them for this type."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    freqs = 1.0 / (base ** exponents)
    if scaling is None:
        return freqs, 1.0
    s = scaling
    if s.rope_type == "linear":
        return freqs / s.factor, 1.0
    original = s.original_max_position_embeddings or max_position_embeddings
    if s.rope_type == "llama3":
        low_wavelen, high_wavelen = original / s.low_freq_factor, original / s.high_freq_factor
        wavelen = 2 * math.pi / freqs
        scaled = torch.where(wavelen > low_wavelen, freqs / s.factor, freqs)
        smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    factor = s.factor if s.factor is not None else max_position_embeddings / original
    attention = s.attention_factor
    if attention is None:
        if s.mscale and s.mscale_all_dim:
            attention = float(_yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim))
        else:
            attention = _yarn_mscale(factor)
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


def _rotary_embedding_class():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    class HFRotaryEmbedding(RotaryEmbedding):
        """megatron-core's RotaryEmbedding with given inverse frequencies; its cos/sin (the rollout engine's,
        under ``flash_decode``) carry the attention factor, as transformers' do."""

        def __init__(self, kv_channels: int, rotary_percent: float, frequencies: torch.Tensor,
                     attention_factor: float, use_cpu_initialization: bool, cp_group=None):
            super().__init__(kv_channels=kv_channels, rotary_percent=rotary_percent,
                             use_cpu_initialization=use_cpu_initialization, cp_group=cp_group)
            self.inv_freq = frequencies.to(self.inv_freq.device)
            self.attention_factor = attention_factor

        def get_cos_sin(self, max_seq_len: int, offset: int = 0):
            cos, sin = super().get_cos_sin(max_seq_len, offset)
            if self.attention_factor != 1.0:
                cos, sin = cos * self.attention_factor, sin * self.attention_factor
            return cos, sin

    return HFRotaryEmbedding


def _concentration(attention_factor: float) -> Dict[str, float]:
    """Config attributes for which megatron-core 0.16.1's ``_yarn_get_concentration_factor(f, m, m_all)`` =
    (0.1 m ln f + 1) / (0.1 m_all ln f + 1) is ``attention_factor``: f = e, m = 10 (A - 1), m_all = 0."""
    return dict(yarn_rotary_scaling_factor=math.e, yarn_mscale=10.0 * (attention_factor - 1.0),
                yarn_mscale_all_dim=0.0)


def install(model, arch) -> None:
    """Give a GPTModel built with position_embedding_type='rope' transformers' RoPE for ``arch`` (see the
    module docstring for why this works around megatron-core 0.16.1, and how)."""
    config = model.config
    dim = rotary_dim(arch.kv_channels, arch.rotary_percent)
    frequencies, attention = inv_freq(arch.rope_scaling, dim, arch.rotary_base, arch.max_position_embeddings)
    old = model.rotary_pos_emb
    model.rotary_pos_emb = _rotary_embedding_class()(
        arch.kv_channels, arch.rotary_percent, frequencies, attention, config.use_cpu_initialization,
        cp_group=old.cp_group)
    model.rotary_pos_emb_cache = {}
    if attention != 1.0:
        for name, value in _concentration(attention).items():
            setattr(config, name, value)
