"""Write a Megatron model (one process, TP=PP=1) as an HF folder: safetensors (+ index), config, tokenizer.

The folder is written under ``<out>.tmp`` and renamed when complete, so a
failed export never leaves a folder that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from megatron_swift.convert.hf_config import read_hf_config, to_hf_config
from megatron_swift.convert.hf_load import Context, compile_rules, match_rule

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
           "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja")


def hf_tensors(chunk, family, arch: dict, padded_vocab: int, dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """HF name -> tensor for every parameter of an unsharded GPTModel."""
    rules = compile_rules(family.weights(tied=not arch["untie_embeddings"]))
    ctx = Context(arch["num_query_groups"], arch["kv_channels"], padded_vocab, tp=1, vocab_size=arch["vocab_size"])
    out: Dict[str, torch.Tensor] = {}
    for name, param in chunk.named_parameters():
        rule, layer = match_rule(name, rules, 0, "export")
        for hf_name, tensor in rule.split(param.detach(), layer, ctx).items():
            # A tied output layer maps onto the embedding, which is written once. The clone
            # detaches from the parameter: split views share storage, which safetensors refuses.
            out.setdefault(hf_name, tensor.to(dtype or tensor.dtype).contiguous().clone())
    return out


def write_folder(tensors: Dict[str, torch.Tensor], out_dir: str, config: dict, source: Optional[str],
                 max_shard_bytes: int = 2 * 2**30) -> None:
    """Shard tensors into safetensors files (with an index when more than one) and add config/tokenizer files."""
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    for name in _COPIED if source else ():
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
    if os.path.exists(out_dir):
        os.rmdir(out_dir)
    os.rename(tmp, out_dir)


def export_hf(chunk, family, arch: dict, padded_vocab: int, out_dir: str, source: Optional[str] = None,
              dtype: Optional[str] = None) -> None:
    """Export one unsharded GPTModel; config.json is the source folder's when there is one."""
    torch_dtype = _DTYPES[dtype] if dtype else None
    tensors = hf_tensors(chunk, family, arch, padded_vocab, torch_dtype)
    written = next(iter(tensors.values())).dtype
    if source and os.path.isfile(os.path.join(source, "config.json")):
        config = read_hf_config(source)
        config["torch_dtype"] = _DTYPE_NAMES[written]
        config.pop("dtype", None)
    else:
        config = to_hf_config(family, arch, _DTYPE_NAMES[written])
    write_folder(tensors, out_dir, config, source)
