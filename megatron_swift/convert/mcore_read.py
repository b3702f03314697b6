"""Read a megatron-swift checkpoint one decoder layer at a time, without building the whole model.

megatron-core stores each layer parameter once for all layers (a leading
layer axis in global coordinates). A one-layer GPTModel is built and, for
layer ``i``, its layer's sharded state dict is addressed to position ``i`` of
that axis (as TransformerBlock.sharded_state_dict does for its own layers);
then exactly those boxes are read from the torch_dist files by PyTorch's
distributed-checkpoint reader. Peak memory is the embedding and output layer
plus one layer, whatever the model's depth.

Nothing is unpickled unrestricted: the metadata goes through
``training.safe_load.SafeFileSystemReader`` and any bytes item through
``SafeLoadPlanner``, so a crafted checkpoint is refused before it runs code
(UnsafeCheckpointError, a ValueError).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Iterator, List, Tuple

import torch
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from megatron_swift.training.safe_load import SafeFileSystemReader, SafeLoadPlanner, dcp_load

_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def stored_dtype(ckpt: str) -> torch.dtype:
    """The dtype the model weights were saved in (that of the word embedding or first stored weight)."""
    tensors = SafeFileSystemReader(ckpt).read_metadata().state_dict_metadata
    meta = (next((v for k, v in tensors.items() if k.endswith("embedding.word_embeddings.weight")), None)
            or next(v for k, v in tensors.items() if k.endswith((".weight", "_lora.a"))))
    return meta.properties.dtype


class LayerwiseCheckpoint:
    """A checkpoint's parameters as (Megatron name, tensor), the non-layer ones first, then layer by layer."""

    def __init__(self, ckpt: str):
        from omegaconf import OmegaConf

        from megatron_swift import backend as backend_mod
        from megatron_swift.models import families
        from megatron_swift.models.arch import Arch
        from megatron_swift.training import checkpoint

        self.ckpt = ckpt
        self.meta = checkpoint.read_meta(ckpt)["model"]
        self.cfg = OmegaConf.load(os.path.join(ckpt, "config.yaml"))
        self.dtype = stored_dtype(ckpt)
        self.family = families.get(self.meta["family"])
        self.num_layers = self.meta["arch"]["num_layers"]
        self.layers = self.family.layers_prefix  # the language decoder's layers: read one at a time
        # One process, every parallel size 1; weights kept in the dtype they were saved in.
        self.cfg.parallel = OmegaConf.merge(self.cfg.parallel, dict(
            tp=1, pp=1, vpp=None, sp=False, cp=1, ep=1, etp=None, distributed_optimizer=False))
        self.cfg.train.device, self.cfg.train.precision = "cpu", _PRECISION[self.dtype]
        be = backend_mod.init("cpu")
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel()
        # Layers of two kinds (dense MLP among MoE layers) are stored per layer, each read into a one-layer
        # model of its kind (1: routed experts, 0: dense), built when first needed.
        pattern = Arch(family=self.family, **self.meta["arch"]).moe_layer_pattern
        self.kinds = pattern or [None] * self.num_layers
        self.per_layer = pattern is not None
        self._backend = be
        self.adapter_only = bool(checkpoint.read_meta(ckpt).get("adapter_only"))
        self._models = {}
        self.model = self._model_of(self.kinds[0])
        self._stored = SafeFileSystemReader(ckpt).read_metadata().state_dict_metadata

    def _one_layer_model(self, kind):
        """A one-layer model whose layer is of ``kind`` (None: the model's only kind)."""
        from megatron_swift.models.arch import Arch
        from megatron_swift.models.builder import build_model, transformer_config

        fields = dict(self.meta["arch"], num_layers=1)
        if kind is not None:  # that layer routes (1) or is dense (0), whatever the model's pattern says
            fields.update(moe_dense_first=0, moe_sparse_step=1, moe_dense_layers=() if kind else (0,))
        arch = Arch(family=self.family, **fields)
        be = self._backend
        tconfig = transformer_config(arch, self.cfg, be, initialize=False)
        (model,) = build_model(arch, tconfig, self.meta["padded_vocab_size"], self.cfg.train.seq_length, be)
        if self.cfg.get("tuner", {}).get("name", "none") == "lora":
            from megatron_swift.tuners.apply import apply_tuner

            apply_tuner([model], self.cfg, check_patterns=False)  # the adapters' parameters, to read into
        model.requires_grad_(False)  # read in place into views of the weights
        return model

    def _model_of(self, kind):
        if kind not in self._models:
            self._models[kind] = self._one_layer_model(kind)
        return self._models[kind]

    def sections(self):
        """(layer index, its parameters) in reading order: (None, embedding/norm/output) then each layer."""
        yield None, self.non_layer_params()
        for index in range(self.num_layers):
            yield index, self.layer_params(index)

    def non_layer_params(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Embedding, final norm and output layer (and a VLM's vision encoder and projector, and the
        multi-token-prediction layers, whose transformer layer is of the last decoder layer's kind)."""
        self.model = self._model_of(self.kinds[-1])
        sharded = {k: v for k, v in self.model.sharded_state_dict().items() if not k.startswith(self.layers)}
        yield from self._read(sharded, lambda name: not name.startswith(self.layers))

    def layer_params(self, index: int) -> Iterator[Tuple[str, torch.Tensor]]:
        """Parameters of decoder layer ``index``, named as layer 0 (``decoder.layers.0.*``)."""
        prefix = self.layers + "0."
        self.model = self._model_of(self.kinds[index])
        layer = self.model.get_submodule(self.layers.rstrip("."))[0]
        if self.adapter_only or self.per_layer:
            # Per-layer keys: an adapter-only checkpoint's (and per-expert: training.checkpoint._PER_LAYER), or
            # those megatron-core writes for layers of two kinds.
            extra = dict(non_homogeneous_layers=True, singleton_local_shards=True) if self.adapter_only else None
            sharded = layer.sharded_state_dict(prefix, [], ensure_metadata_has_dp_cp_group(extra))
            replace_prefix_for_sharding(sharded, prefix, f"{self.layers}{index}.")
        else:
            sharded = layer.sharded_state_dict(prefix, [(0, index, self.num_layers)],
                                               ensure_metadata_has_dp_cp_group(None))
            replace_prefix_for_sharding(sharded, prefix, self.layers)
        yield from self._read(sharded, lambda name: name.startswith(prefix))

    def _read(self, sharded: Dict[str, object], wanted) -> Iterator[Tuple[str, torch.Tensor]]:
        """The wanted parameters; of an adapter-only checkpoint, those it holds (adapters, trained modules)."""
        stored = {id(getattr(v, "data", None)) for v in _sharded_tensors(dict(sharded))}
        params = [(name, p) for name, p in self.model.named_parameters() if wanted(name)]
        # Buffers a checkpoint holds (a router's expert bias), after the parameters.
        params += [(name, b) for name, b in self.model.named_buffers() if wanted(name) and id(b) in stored]
        if self.adapter_only:
            sharded = {k: v for k, v in sharded.items() if self._holds(v)}
            held = {id(getattr(v, "data", None)) for v in sharded.values()}
            params = [(name, p) for name, p in params if id(p) in held]
        for _, param in params:  # NaN marks anything the checkpoint did not fill
            param.fill_(float("nan"))
        self._load(sharded)
        for name, param in params:
            if torch.isnan(param).any():
                raise KeyError(f"{self.ckpt}: parameter '{name}' was not (fully) read from the checkpoint, "
                               "or the checkpoint holds NaN in it")
            yield name, param

    def _holds(self, entry) -> bool:
        """Whether the checkpoint holds every element of this entry's box(es) (the layer or expert
        addressed): an adapter-only checkpoint holds only what was trained, perhaps only in some layers."""
        for item in _sharded_tensors({"entry": entry}):
            if not isinstance(item, ShardedTensor) or item.key not in self._stored:
                return False
            box = list(zip(item.global_offset, (1,) * item.prepend_axis_num + tuple(item.local_shape)))
            covered = 0
            for chunk in self._stored[item.key].chunks:
                overlap = 1
                for (start, size), c_start, c_size in zip(box, chunk.offsets, chunk.sizes):
                    overlap *= max(0, min(start + size, c_start + c_size) - max(start, c_start))
                covered += overlap
            if covered != torch.Size([size for _, size in box]).numel():
                return False
        return True

    def _load(self, sharded: Dict[str, object]) -> None:
        """Read every ShardedTensor of ``sharded`` (its box of the stored global tensor) into its own data."""
        boxes = {}
        for item in _sharded_tensors(sharded):
            if isinstance(item, ShardedTensor):
                # The stored tensor has the prepended (layer, expert) axes; the box is one element wide on them.
                sizes = (1,) * item.prepend_axis_num + tuple(item.local_shape)
                boxes[item.key + "@" + ",".join(map(str, item.global_offset))] = (item.key, item.global_offset,
                                                                                 item.data.view(sizes))
        dcp_load({}, self.ckpt, _BoxPlanner(self.ckpt, boxes), no_dist=True)


def _sharded_tensors(sharded: Dict[str, object]) -> List[object]:
    """The ShardedTensors of a sharded state dict with factories (e.g. SwiGLU's gate/up halves) built.

    The factories' tensors are views of the parameters, so reading into them fills the parameters."""
    apply_factories(sharded)
    leaves: List[object] = []
    dict_list_map_inplace(lambda x: leaves.append(x) or x, sharded)
    return leaves


class _BoxPlanner(SafeLoadPlanner):
    """Loads, per request, one box (offsets, shape of the destination) of a stored tensor into a given tensor.

    megatron-core's torch_dist loader insists that the processes together read
    whole tensors; this planner lets one process read one layer's box at a time.
    It plans tensor reads only; SafeLoadPlanner keeps any bytes item restricted all the same."""

    def __init__(self, ckpt: str, boxes: Dict[str, Tuple[str, Tuple[int, ...], torch.Tensor]]):
        super().__init__(ckpt)
        self.boxes = boxes

    def create_local_plan(self) -> LoadPlan:
        items = []
        for request, (key, offsets, dest) in self.boxes.items():
            if key not in self.metadata.state_dict_metadata:
                raise KeyError(f"tensor '{key}' is not in the checkpoint")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            for read in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk]):
                items.append(dataclasses.replace(read, dest_index=dataclasses.replace(read.dest_index, fqn=request)))
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        dest = self.boxes[read_item.dest_index.fqn][2]
        return narrow_tensor_by_index(dest, read_item.dest_offsets, read_item.lengths)
