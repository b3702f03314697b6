"""Write a Megatron checkpoint as an HF folder: sharded safetensors (+ index), config, tokenizer files.

Streaming: the checkpoint is read one decoder layer at a time (mcore_read),
each parameter is split into its HF tensors by the family's table, and those
go into the current safetensors shard, which is written out as soon as it is
full. Peak memory is about one shard plus the embedding, output layer and one
layer. The folder is assembled under ``<out>.tmp`` and renamed when complete,
so a failed export never leaves a folder that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterable, Optional, Tuple

import torch

from megatron_swift.convert.hf_config import read_hf_config
from megatron_swift.convert.hf_load import Context, compile_rules
from megatron_swift.convert.new_token_assets import write_new_tokens
from megatron_swift.convert.safetensors_io import save
from megatron_swift.convert.to_hf import hf_tensors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
           "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
           "chat_template.json", "preprocessor_config.json", "processor_config.json",
           "video_preprocessor_config.json")


class ShardWriter:
    """Safetensors shards of at most ``max_shard_bytes``, written as they fill; index and final names at close."""

    def __init__(self, folder: str, max_shard_bytes: int):
        self.folder, self.max_bytes = folder, max_shard_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list = []  # [(temporary file name, [tensor names])]
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        # A clone: split views share storage with the parameter, which safetensors refuses.
        self.pending[name] = tensor.contiguous().clone()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        file = f"part-{len(self.files):05d}.safetensors"
        save(self.pending, os.path.join(self.folder, file), metadata={"format": "pt"})
        self.files.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.files:
            self._flush()
        count = len(self.files)
        weight_map = {}
        for i, (file, names) in enumerate(self.files, start=1):
            final = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            os.rename(os.path.join(self.folder, file), os.path.join(self.folder, final))
            weight_map.update({name: final for name in names})
        if count > 1:
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)


def export_checkpoint(ckpt: str, out_dir: str, source: Optional[str] = None, dtype: Optional[str] = None,
                      max_shard_bytes: int = 5 * 2**30, export: Optional[str] = None) -> None:
    """Stream checkpoint ``ckpt`` (an iter_N dir) into a new HF folder; ``dtype`` defaults to the stored one.

    A LoRA run's adapter-only checkpoint is merged into its base (``export="merged"``, the default
    being the run's tuner.export) or written as a PEFT adapter (``"adapter"``); ``source`` is then
    the base: an HF folder, else the run's model.load checkpoint is used."""
    from megatron_swift.convert.mcore_read import LayerwiseCheckpoint

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new --out")
    from megatron_swift.models.arch import Arch

    reader = LayerwiseCheckpoint(ckpt)
    arch, family = reader.meta["arch"], reader.family
    torch_dtype = DTYPES[dtype] if dtype else reader.dtype
    full = Arch(family=family, **arch)
    rules = compile_rules(family.rules(full))
    dense = Context(arch["num_query_groups"], arch["kv_channels"], reader.meta["padded_vocab_size"], tp=1,
                    vocab_size=arch["vocab_size"])
    ctx = lambda name: family.context(name, full, dense)  # noqa: E731
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if reader.adapter_only:
            _write_lora(reader, rules, ctx, tmp, source, dtype and torch_dtype, max_shard_bytes,
                        export or reader.cfg.tuner.export)
        else:
            writer = ShardWriter(tmp, max_shard_bytes)
            _write_tensors(reader, rules, ctx, torch_dtype, writer, _unused_from(source, family, full))
            _write_config(tmp, family, arch, _DTYPE_NAMES[torch_dtype], source)
            if not source:
                family.export_assets(tmp, reader.cfg.model, arch)
        write_new_tokens(tmp, list(reader.cfg.model.get("new_tokens") or []), arch["vocab_size"],
                         reader.meta.get("new_token_rows"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    _finish(tmp, out_dir)


def _write_tensors(reader, rules, ctx, dtype: torch.dtype, writer: ShardWriter, unused=()) -> None:
    """Every parameter as its HF tensors, then ``unused`` ((name, tensor): what the source folder holds that
    the model does not use, such as a VLM's vision layers after the feature layer) as they were."""
    written = set()
    for layer, params in reader.sections():
        for hf_name, tensor in hf_tensors(params, rules, ctx, layer or 0, dtype):
            if hf_name not in written:  # a tied output layer maps onto the embedding, written once
                writer.add(hf_name, tensor)
                written.add(hf_name)
    for hf_name, tensor in unused:
        writer.add(hf_name, tensor.to(dtype))
    writer.close()


def _unused_from(source: Optional[str], family, arch) -> Iterable[Tuple[str, torch.Tensor]]:
    """The source HF folder's tensors this model does not use by design (family.hf_unused), so that the
    export is the source checkpoint again. Without a source the config describes the model as built, and the
    family fills in what transformers' module has besides it (family.hf_fill)."""
    if not source or not os.path.isfile(os.path.join(source, "config.json")):
        yield from family.hf_fill(arch).items()
        return
    from megatron_swift.convert.fp8 import Dequantizing, is_scale
    from megatron_swift.convert.hf_load import open_checkpoint

    reader = open_checkpoint(source, family.canonical_hf_name)  # FP8 weights come out dequantized
    quantized = isinstance(reader, Dequantizing)
    for name in sorted(reader.file_of):
        if family.hf_unused(arch, name) and not (quantized and is_scale(name)):
            yield name, reader.read(name)


def _write_lora(reader, rules, ctx: Context, folder: str, source: Optional[str], dtype: Optional[torch.dtype],
                max_shard_bytes: int, export: str) -> None:
    """An adapter-only checkpoint: merged into its base (read again, layer by layer) or a PEFT adapter."""
    from megatron_swift.convert import lora_export as lx

    tuner, family, arch = reader.cfg.tuner, reader.family, reader.meta["arch"]
    if export == "adapter":
        tensors, indices = {}, {}
        for layer, params in reader.sections():
            adapters, full = lx.split_trained(params)
            found, rows, full = lx.token_rows(full, rules, ctx, reader.meta.get("new_token_rows") or [])
            indices.update(found)
            tensors.update(lx.peft_tensors((adapters, full), rules, ctx, layer or 0))
            tensors.update(rows)
        modules = {key.split(".")[-3] for key in tensors if ".lora_" in key}
        lx.write_adapter(folder, tensors, lx.adapter_config(tuner, modules, source or "", reader.cfg.task.name,
                                                            indices))
        _write_config(folder, family, arch, "float32", source, config_name=None)
        return
    load = reader.cfg.model.get("load")
    if source:
        base = lx.HFBase(source, family.canonical_hf_name)
    elif load:
        base = lx.McoreBase(load, rules, ctx)
    else:
        raise FileNotFoundError("the LoRA run's base weights are not found: pass the base HF folder (--base)")
    writer, scale, dtype_name = ShardWriter(folder, max_shard_bytes), lx.lora_scale(tuner), None
    for layer, params in reader.sections():
        tensors = base.tensors(layer)
        lx.merge_into(tensors, lx.split_trained(params), rules, ctx, layer or 0, scale)
        for name, tensor in tensors.items():
            tensor = tensor.to(dtype) if dtype else tensor
            dtype_name = dtype_name or _DTYPE_NAMES[tensor.dtype]
            writer.add(name, tensor)
    writer.close()
    _write_config(folder, family, arch, dtype_name, source)


def _write_config(folder: str, family, arch: dict, dtype_name: str, source: Optional[str],
                  config_name: Optional[str] = "config.json") -> None:
    """config.json is the source folder's (dtype updated) when there is one; tokenizer files are copied.
    ``config_name=None`` copies the tokenizer files only (a PEFT adapter folder)."""
    if source and os.path.isfile(os.path.join(source, "config.json")):
        config = read_hf_config(source)
        config["torch_dtype"] = dtype_name
        config.pop("dtype", None)
        if config.pop("quantization_config", None) is not None:  # convert.fp8: dequantized when loaded
            print(f"export: the source's quantized weights (quantization_config) are written as {dtype_name}; "
                  "quantization_config is left out of config.json", flush=True)
    else:
        config = family.write_hf(arch, dtype_name)
    if arch.get("head") == "reward":  # transformers reads the score of the last non-padding token
        config.update(architectures=[family.hf_reward_architecture], id2label={"0": "LABEL_0"},
                      label2id={"LABEL_0": 0})
    if config_name:
        with open(os.path.join(folder, config_name), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    for name in _COPIED if source else ():
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy2(os.path.join(source, name), os.path.join(folder, name))


def _finish(tmp: str, out_dir: str) -> None:
    if os.path.exists(out_dir):
        os.rmdir(out_dir)  # empty (checked before starting)
    os.rename(tmp, out_dir)
