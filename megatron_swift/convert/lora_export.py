"""Export a LoRA run (an adapter-only checkpoint) as a merged HF model or as a PEFT adapter folder.

The checkpoint holds the adapters (and any module trained in full next to
them); the base is the run's model.pretrained HF folder or model.load
checkpoint, read again here. Both are streamed one decoder layer at a time.

- merged: each adapted linear's update ``scale * B @ A`` (Megatron layout,
  unsharded) is split into HF tensors by the family's table (fused QKV into
  q/k/v, fused gate/up into gate/up) and added to the base tensors; modules
  trained in full replace theirs. The result is a plain HF model.
- adapter: PEFT's format. A fused linear's one A serves each HF projection it
  feeds (q, k and v share A, as do gate and up) and B is split by the same
  table, so ``peft`` applied to the HF base computes what the Megatron model
  computes. Keys: ``base_model.model.<HF module>.lora_A.weight`` / ``lora_B``.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_swift.convert.hf_load import Context, SafetensorsFolder, context_of, match_rule
from megatron_swift.convert.safetensors_io import save
from megatron_swift.convert.to_hf import hf_tensors

# A decoder layer's HF tensors: model.layers.N. (a VLM's language model: language_model.model.layers.N.).
_HF_LAYER = re.compile(r"^(?:\w+\.)?model\.layers\.(\d+)\.")
_ADAPTER = re.compile(r"^(?P<base>.*)_lora\.(?P<part>[ab])$")


class HFBase:
    """Base tensors from an HF folder, by decoder layer."""

    def __init__(self, folder: str, canonical=None):
        self.reader = SafetensorsFolder(folder, canonical)
        self.layers: Dict[int, List[str]] = {}
        self.rest: List[str] = []
        for name in self.reader.file_of:
            match = _HF_LAYER.match(name)
            (self.layers.setdefault(int(match.group(1)), []) if match else self.rest).append(name)

    def tensors(self, layer: Optional[int]) -> Dict[str, torch.Tensor]:
        """Decoder layer ``layer``'s tensors, or (None) the embedding, final norm and LM head."""
        names = self.rest if layer is None else self.layers.get(layer, [])
        return {name: self.reader.read(name) for name in names}


class McoreBase:
    """Base tensors from a megatron-swift checkpoint, turned into HF tensors by the family's table."""

    def __init__(self, ckpt: str, rules, ctx: Context):
        from megatron_swift.convert.mcore_read import LayerwiseCheckpoint

        self.reader, self.rules, self.ctx, self._hf = LayerwiseCheckpoint(ckpt), rules, ctx, hf_tensors

    def tensors(self, layer: Optional[int]) -> Dict[str, torch.Tensor]:
        """As HFBase.tensors, from the checkpoint."""
        params = self.reader.non_layer_params() if layer is None else self.reader.layer_params(layer)
        return dict(self._hf(params, self.rules, self.ctx, layer or 0, self.reader.dtype))


def lora_scale(tuner) -> float:
    return tuner.alpha / (math.sqrt(tuner.rank) if tuner.rslora else tuner.rank)


def split_trained(params: Iterable[Tuple[str, torch.Tensor]]):
    """({Megatron base weight name: (A, B)}, [(name, tensor) of parameters trained in full])."""
    adapters: Dict[str, Dict[str, torch.Tensor]] = {}
    full = []
    for name, tensor in params:
        match = _ADAPTER.match(name)
        if match:
            adapters.setdefault(match.group("base") + ".weight", {})[match.group("part")] = tensor
        else:
            full.append((name, tensor))
    return {name: (parts["a"], parts["b"]) for name, parts in adapters.items()}, full


def merge_into(base: Dict[str, torch.Tensor], trained, rules, ctx: Context, offset: int, scale: float) -> None:
    """Add each adapter's update to the base HF tensors and put fully trained tensors in place, in place."""
    adapters, full = trained
    for mname, (a, b) in adapters.items():
        rule, layer = match_rule(mname, rules, {"layer": offset}, "export")
        # a stacked-experts tensor (rules.StackedExperts) takes this expert's delta in its own slice only
        rows = slice(int(layer["expert"]), int(layer["expert"]) + 1) if getattr(rule, "experts", 0) else slice(None)
        for hf_name, delta in rule.split((b.float() @ a.float()) * scale, layer, context_of(ctx, mname)).items():
            merged = base[hf_name].float().clone()
            merged[rows] += delta
            base[hf_name] = merged.to(base[hf_name].dtype)
    for hf_name, tensor in hf_tensors(full, rules, ctx, offset, torch.float32):
        base[hf_name] = tensor.to(base[hf_name].dtype)


def token_rows(full, rules, ctx: Context, rows: List[int]):
    """Fully trained embedding / output layer of a run with new tokens (models/new_tokens.py trains only their
    rows) as PEFT trainable tokens: ({HF module: rows}, {key: the rows' values}); ``full`` keeps the rest."""
    indices, tensors, rest = {}, {}, []
    for name, tensor in full:
        if not rows or not name.endswith(("embedding.word_embeddings.weight", "output_layer.weight")):
            rest.append((name, tensor))
            continue
        for hf_name, value in hf_tensors([(name, tensor)], rules, ctx, 0, tensor.dtype):
            module = hf_name[: -len(".weight")]
            indices[module.split(".")[-1]] = list(rows)
            tensors[f"base_model.model.{module}.token_adapter.trainable_tokens_delta"] = value[rows].contiguous()
    return indices, tensors, rest


def peft_tensors(trained, rules, ctx: Context, offset: int) -> Dict[str, torch.Tensor]:
    """PEFT keys and tensors of one section's adapters."""
    adapters, full = trained
    if full:
        raise ValueError(f"tuner.export=adapter cannot hold parameters trained in full ({full[0][0]}, ...): "
                         "export merged instead (tools/convert/mcore_to_hf.py --export merged)")
    out = {}
    for mname, (a, b) in adapters.items():
        if ".experts." in mname:
            raise ValueError("tuner.export=adapter does not cover MoE expert adapters; export merged instead")
        rule, layer = match_rule(mname, rules, {"layer": offset}, "export")
        for hf_name, b_part in rule.split(b, layer, context_of(ctx, mname)).items():
            module = "base_model.model." + hf_name[: -len(".weight")]
            out[f"{module}.lora_A.weight"] = a.contiguous().clone()
            out[f"{module}.lora_B.weight"] = b_part.contiguous().clone()
    return out


def adapter_config(tuner, modules: Iterable[str], base: str, task: str, token_indices=None) -> dict:
    return {
        **({"trainable_token_indices": token_indices} if token_indices else {}),
        "peft_type": "LORA", "task_type": "SEQ_CLS" if task == "rm" else "CAUSAL_LM",
        "base_model_name_or_path": base, "r": tuner.rank, "lora_alpha": tuner.alpha,
        "lora_dropout": tuner.dropout, "use_rslora": tuner.rslora, "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "target_modules": sorted(modules), "modules_to_save": None,
    }


def write_adapter(folder: str, tensors: Dict[str, torch.Tensor], config: dict) -> None:
    save(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
