"""Stream HF safetensors into this rank's sharded Megatron model chunks.

Each Megatron parameter is matched to a rule of the family's weight table and
built from only the rows of the HF tensors that this rank's shard needs
(safetensors slices, read lazily), then copied in. Afterwards the ranks
compare notes: every tensor of the checkpoint must have been used by some
rank. Nothing is pickled: only safetensors are read.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_swift.convert.rules import Part
from megatron_swift.data.errors import DataError

# Tensors some HF checkpoints carry that no model weight comes from (recomputed buffers).
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


class SafetensorsFolder:
    """Tensors of an HF folder (``model.safetensors`` or a sharded set with its index), read lazily by slice."""

    def __init__(self, folder: str, canonical=None):
        """``canonical``: on-disk name -> the name rules use (a family's ``canonical_hf_name``)."""
        from safetensors import safe_open

        self.folder = folder
        self._safe_open = safe_open
        self.used: Set[str] = set()
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    self.file_of = dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise DataError(index, None, f"not a safetensors index ({e.__class__.__name__}: {e})") from None
        elif os.path.isfile(single):
            with self._open(single) as f:
                self.file_of = {k: "model.safetensors" for k in f.keys()}
        else:
            raise DataError(folder, None, "no model.safetensors or model.safetensors.index.json (model.pretrained)")
        self.disk_name = {name: name for name in self.file_of}
        if canonical is not None:
            self.disk_name = {canonical(name): name for name in self.file_of}
            self.file_of = {name: self.file_of[disk] for name, disk in self.disk_name.items()}

    def _open(self, path: str):
        """safetensors' reader; a truncated or damaged file is a DataError naming it, not a SafetensorError."""
        try:
            return self._safe_open(path, framework="pt")
        except Exception as e:  # SafetensorError (not importable by name in every release), OSError
            raise DataError(path, None, f"cannot read this safetensors file ({e}); is it complete? "
                                        "(model.pretrained)") from None

    def _file(self, name: str) -> str:
        if name not in self.file_of:
            raise DataError(self.folder, None, f"tensor '{name}' is missing from the checkpoint")
        return os.path.join(self.folder, self.file_of[name])

    def shape(self, name: str) -> Tuple[int, ...]:
        with self._open(self._file(name)) as f:
            return tuple(f.get_slice(self.disk_name[name]).get_shape())

    def read(self, name: str, dim: int = 0, start: Optional[int] = None, stop: Optional[int] = None) -> torch.Tensor:
        """A copy of the rows; the file is opened per read so that its memory map (and the pages it
        brought in) is released at once instead of growing to the whole checkpoint."""
        self.used.add(name)
        with self._open(self._file(name)) as f:
            view = f.get_slice(self.disk_name[name])
            rows = slice(start, stop)
            return view[rows] if dim == 0 else view[:, rows]


@dataclass(frozen=True)
class Context:
    """What transforms need to know about the model and layout (``tp``: the TP size of this parameter)."""

    num_query_groups: int
    kv_channels: int
    padded_vocab: int
    tp: int
    vocab_size: int = 0


def context_of(ctx, name: str) -> Context:
    """``ctx`` itself, or, when it is a function of the parameter's name (a VLM: its encoder has other heads
    than its language model), its value for ``name``."""
    return ctx(name) if callable(ctx) else ctx


def compile_rules(rules) -> List[Tuple[re.Pattern, object]]:
    compiled = []
    for rule in rules:
        for name in rule.mcore:
            pattern = re.escape(name)
            for key in ("layer", "expert"):
                pattern = pattern.replace(re.escape("{" + key + "}"), rf"(?P<{key}>\d+)")
            compiled.append((re.compile(pattern + "$"), rule))
    return compiled


def match_rule(name: str, rules, offsets: Dict[str, int], where: str):
    """The rule for Megatron parameter ``name`` and its wildcard values (local index + offset = global)."""
    for pattern, rule in rules:
        match = pattern.match(name)
        if match:
            values = {key: str(offsets.get(key, 0) + int(v)) for key, v in match.groupdict().items()}
            return rule, values
    raise DataError(where, None, f"no HF tensor maps to Megatron parameter '{name}'")


def load_hf_weights(chunks, folder: str, arch, padded_vocab: int) -> None:
    """Fill every parameter of ``chunks`` (this rank's model chunks) from the HF folder."""
    family = arch.family
    if arch.decoder_family.weights is None:
        raise DataError(folder, None, f"loading HF weights is not supported yet for family {family.name}")
    reader = open_checkpoint(folder, family.canonical_hf_name)
    reader.used.update(n for n in reader.file_of if family.hf_unused(arch, n))  # declared unused by design
    if not arch.untie_embeddings:
        reader.used.add(family.hf_head)  # a tied copy some checkpoints carry; transformers ignores it too
    fresh_head = _check_head(reader, arch.head, family.hf_head)
    for name, param, rules, offsets, ctx, rank in param_sources(chunks, arch, padded_vocab):
        if fresh_head and name.endswith("output_layer.weight"):
            continue  # a new reward head keeps its initial values
        _load_param(name, param, rules, reader, offsets, ctx, rank)
        param.loaded_from_checkpoint = True  # models/unloaded.py initialises the others
    _check_all_used(reader)


def param_sources(chunks, arch, padded_vocab: int):
    """(Megatron name, parameter, compiled rules, wildcard offsets, Context, TP rank of its shard) for every
    parameter of ``chunks``: what building it from HF tensors needs (loading, and models/init_strategy.py)."""
    rules = compile_rules(arch.family.rules(arch))
    dense = Context(arch.num_query_groups, arch.kv_channels, padded_vocab, ps.get_tensor_model_parallel_world_size(),
                    vocab_size=arch.vocab_size or 0)
    expert = replace(dense, tp=ps.get_expert_tensor_parallel_world_size())
    tp_rank, etp_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    num_local_experts = (arch.num_experts or 0) // ps.get_expert_model_parallel_world_size()
    expert_offset = ps.get_expert_model_parallel_rank() * num_local_experts
    vpp = len(chunks)
    for vp_stage, chunk in enumerate(chunks):
        # The language layers' global numbers; a VLM's vision layers sit on the first stage, offset 0 too.
        offsets = dict(layer=get_transformer_layer_offset(chunk.config, vp_stage=vp_stage if vpp > 1 else None),
                       expert=expert_offset)
        for name, param in loadable_tensors(chunk, rules):
            # Expert weights are not all-reduced across DP and are split over the expert TP group.
            is_expert = not getattr(param, "allreduce", True)
            ctx, rank = (expert, etp_rank) if is_expert else (arch.family.context(name, arch, dense), tp_rank)
            yield name, param, rules, offsets, ctx, rank


def open_checkpoint(folder: str, canonical=None):
    """A SafetensorsFolder, or for an FP8 block-quantized checkpoint one that dequantizes (convert.fp8)."""
    from megatron_swift.convert import fp8
    from megatron_swift.convert.hf_config import read_hf_config

    reader = SafetensorsFolder(folder, canonical)
    block = fp8.block_size(read_hf_config(folder), folder)
    return fp8.Dequantizing(reader, block) if block else reader


def loadable_tensors(module, rules):
    """(name, tensor) of every parameter, and of the buffers the table names (a router's expert bias is a
    buffer in megatron-core, a tensor of the checkpoint)."""
    yield from module.named_parameters()
    for name, buffer in module.named_buffers():
        if any(pattern.match(name) for pattern, _ in rules):
            yield name, buffer


def _check_head(reader: SafetensorsFolder, head: str, lm_head: str = "lm_head.weight") -> bool:
    """Whether the model's output layer is a new reward head (a reward model started from a causal LM)."""
    has_score = "score.weight" in reader.file_of
    if head == "lm" and has_score and lm_head not in reader.file_of:
        raise DataError(reader.folder, None, "this is a reward (sequence-classification) model, which has no LM "
                        "head: train it with task=rm")
    if head == "reward" and not has_score:
        reader.used.add(lm_head)  # the causal LM's head: a reward model does not use it
        return True
    return False


def _load_param(name, param, rules, reader, offsets, ctx: Context, tp_rank: int) -> None:
    rule, layer = match_rule(name, rules, offsets, reader.folder)
    part = Part(param.partition_dim, tp_rank, ctx.tp) if getattr(param, "tensor_model_parallel", False) else None
    shard = rule.build(reader, layer, ctx, part)
    if tuple(shard.shape) != tuple(param.shape):
        sources = ", ".join(n.format(**layer) for n in rule.hf_names())
        raise DataError(reader.folder, None, f"shape mismatch for '{sources}' -> '{name}': expected "
                        f"{tuple(param.shape)} on this rank, found {tuple(shard.shape)}")
    with torch.no_grad():
        param.copy_(shard.to(param.dtype))


def _check_all_used(reader: SafetensorsFolder) -> None:
    """Every rank raises the same error when some checkpoint tensor was read by no rank."""
    used = [reader.used]
    if dist.is_initialized() and dist.get_world_size() > 1:
        used = [None] * dist.get_world_size()
        dist.all_gather_object(used, reader.used)
    unused = sorted(n for n in set(reader.file_of) - set().union(*used) if not _IGNORED.match(n))
    if unused:
        more = f" (and {len(unused) - 8} more)" if len(unused) > 8 else ""
        raise DataError(reader.folder, None, f"{len(unused)} tensors in the checkpoint are not used by the model "
                        f"(is config.json the one these weights were saved with?): {', '.join(unused[:8])}{more}")


def load_vision_weights(model, folder: str, arch, hf_prefix: Optional[str] = None) -> SafetensorsFolder:
    """Fill a vision encoder (models/vision.py, ``arch``: its VisionArch) from an HF folder holding a CLIP or
    SigLIP vision tower under ``hf_prefix``; returns the reader, whose ``used`` set the caller checks (a VLM
    leaves the layers after its feature layer, and SigLIP's post-layernorm and head, unread).

    ``hf_prefix`` None: found from the patch embedding's name. transformers 4.x saves a CLIPVisionModel's
    tensors under ``vision_model.``, 5.x without it (and a LLaVA's tower under ``vision_tower.`` or
    ``vision_tower.vision_model.``)."""
    from megatron_swift.convert.tables import vit_style

    reader = SafetensorsFolder(folder)
    if hf_prefix is None:
        marker = "embeddings.patch_embedding.weight"
        found = sorted(n[:-len(marker)] for n in reader.file_of if n.endswith(marker))
        if len(found) != 1:
            raise DataError(folder, None, f"expected one vision tower (a tensor named *{marker}), found {found}")
        hf_prefix = found[0]
    rules = compile_rules(vit_style(arch.model_type, hf_prefix))
    ctx = Context(arch.num_attention_heads, arch.kv_channels, 0, ps.get_tensor_model_parallel_world_size())
    for name, param in model.named_parameters():
        _load_param(name, param, rules, reader, {}, ctx, ps.get_tensor_model_parallel_rank())
        param.loaded_from_checkpoint = True
    return reader


def load_composed_weights(chunks, llm: str, vision: str, arch, padded_vocab: int) -> None:
    """A VLM put together from an HF causal-LM folder (its language model: plain GPTModels, loaded as a text
    model is) and an HF CLIP/SigLIP folder (its encoder, on the first pipeline stage); the projector keeps its
    initial values. The encoder folder's unread tensors (the layers after the feature layer, its final norm,
    a CLIPModel's text tower) are not checked: nothing of the model is missing when every parameter is read."""
    text_arch = replace(arch, family=arch.decoder_family, text_family=None, vision=None)
    load_hf_weights([chunk.language_model for chunk in chunks], llm, text_arch, padded_vocab)
    if chunks[0].vision_model is not None:
        load_vision_weights(chunks[0].vision_model, vision, arch.vision)
