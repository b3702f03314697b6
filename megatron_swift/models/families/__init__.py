"""Model families, registered by name and by Hugging Face architecture.

A family is one small module in this package that defines ``FAMILY`` (plus its table parts in
convert/tables.py); adding a module here is all it takes to add a family. Family modules are found by name
(pkgutil), never imported from here, and import only lower layers (models.builder, models.vlm, models.rope,
convert.tables/rules/hf_config): models.arch and everything that resolves a config sit above this package
(tests/test_import_layers.py).
"""
from __future__ import annotations

import importlib
import pkgutil
import os
from typing import Dict

from megatron_swift.data.errors import DataError
from megatron_swift.models.families.base import Family, Size  # noqa: F401

# HF architectures users bring that no family builds yet, with what is missing (said instead of "not supported").
NOT_BUILT = {
    "Gemma3ForCausalLM": "Gemma 3 text (gemma3_text) is not built yet: it needs sliding-window layers with their "
                         "own RoPE base (rope_local_base_freq) between global ones, embeddings scaled by "
                         "sqrt(hidden_size), (1+w) RMSNorms before and after attention and MLP, and "
                         "query_pre_attn_scalar, which megatron-core 0.16.1's GPTModel and this trainer's attention "
                         "do not build exactly",
}

_BY_NAME: Dict[str, Family] = {}
_BY_HF_ARCH: Dict[str, Family] = {}


def _discover() -> None:
    if _BY_NAME:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
        _BY_NAME[family.name] = family
        for arch in family.hf_architectures + (family.hf_reward_architecture,):
            _BY_HF_ARCH[arch] = family


def names() -> list[str]:
    """Registered family names, sorted."""
    _discover()
    return sorted(_BY_NAME)


def get(name: str) -> Family:
    """The family called ``name``; the error lists the known ones."""
    _discover()
    if name not in _BY_NAME:
        raise KeyError(f"unknown model family '{name}'; available: {', '.join(names())}")
    return _BY_NAME[name]


def hf_architectures() -> list[str]:
    """Every HF ``architectures`` entry some family loads."""
    _discover()
    return sorted(_BY_HF_ARCH)


def by_hf_model_type(model_type: str) -> Family:
    """The family whose HF ``model_type`` this is (a VLM's ``text_config``)."""
    _discover()
    for family in _BY_NAME.values():
        if family.hf_model_type == model_type:
            return family
    known = sorted(f.hf_model_type for f in _BY_NAME.values())
    raise KeyError(f"unsupported HF model_type '{model_type}'; supported: {', '.join(known)}")


def by_hf_architecture(arch: str) -> Family:
    """The family registered for an HF ``architectures`` entry."""
    _discover()
    if arch not in _BY_HF_ARCH:
        raise KeyError(f"unsupported HF architecture '{arch}'; supported: {', '.join(sorted(_BY_HF_ARCH))}")
    return _BY_HF_ARCH[arch]


def hf_family_name(hf: dict, folder: str) -> str:
    """The registered family that loads this HF config's ``architectures`` (the tools' +model=)."""
    for arch in hf.get("architectures") or []:
        if arch in hf_architectures():
            return by_hf_architecture(arch).name
    missing = [NOT_BUILT[a] for a in hf.get("architectures") or [] if a in NOT_BUILT]
    if missing:
        raise DataError(os.path.join(folder, "config.json"), None, f"architectures: {missing[0]}")
    raise DataError(os.path.join(folder, "config.json"), None,
                    f"architectures {hf.get('architectures')} are not supported; supported: "
                    f"{', '.join(hf_architectures())}")
