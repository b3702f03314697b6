"""Load megatron-swift checkpoints without running code from them.

A torch_dist checkpoint (megatron-core ``dist_checkpointing`` over PyTorch DCP)
holds three kinds of pickled data, and the stock readers unpickle all of them
with Python's full unpickler, which can call any function a file names:

- ``.metadata``: DCP's ``FileSystemReader.read_metadata`` uses ``pickle.load``;
- bytes items in the ``*.distcp`` files (megatron-core ShardedObjects: our RNG
  and data-stream state, optimizer bookkeeping, ``_extra_state``): DCP's
  ``DefaultLoadPlanner.load_bytes`` uses ``torch.load(weights_only=False)``;
- ``common.pt`` (scheduler state, optimizer settings): megatron-core's common
  strategy calls ``torch.load`` without ``weights_only``, safe under torch's
  default but not when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set.

Here ``.metadata`` goes through an unpickler that resolves only the classes
DCP metadata is made of (see ``_METADATA_OBJECTS``), and the other two through
``torch.load(weights_only=True)`` with the numpy objects that ``np.random``
state needs. Anything else is refused with ``UnsafeCheckpointError`` before it
runs. This is what keeps loading from running code. It does not make a
checkpoint's contents trustworthy: crafted tensors, configs and counters still
load. Exchange models with untrusted parties as HF safetensors (what
tools/convert/mcore_to_hf.py writes), which hold tensors and JSON only.

Written against megatron-core 0.16.1 and torch 2.13. No megatron-core or torch
code is patched. The safe reader, planner and strategies go in through
``dist_checkpointing.load``'s ``sharded_strategy`` and ``common_strategy``
parameters and DCP's ``storage_reader`` and ``planner``.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint import planner as dcp_planner
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from megatron_swift.training.errors import CheckpointError

_ADVICE = "checkpoints from untrusted sources should be exchanged as HF safetensors"
_METADATA_FILE = ".metadata"  # DCP's name for the global metadata file (torch.distributed.checkpoint.filesystem)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks for something loading must not do (call code, read outside the checkpoint)."""


def _printable(text: str, limit: int = 200) -> str:
    """``text`` as one printable line: names taken from a crafted file may hold newlines or escape codes."""
    text = text if text.isprintable() else ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


def _refusal(label: str, reason: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"{_printable(label, 1000)}: refusing to load: {reason}; {_ADVICE}")


def _not_allowed(label: str, global_name: str) -> UnsafeCheckpointError:
    return _refusal(label, f"the file references {_printable(global_name)}, which is not allowed in a checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# .metadata: a restricted unpickler

# Every global that the .metadata files written by this project name. The list was taken from real checkpoints:
# dense, MoE (EP=2, bf16), TP=2 with frozen parameters, LoRA adapter-only, streaming SFT, and hf_to_mcore output.
# SavePlan/WriteItem/TensorWriteData come from megatron-core, which stores the save plans in the metadata
# (``all_local_plans``) to reuse them. Layouts are pickled as calls to torch.serialization._get_layout, which only
# looks a name up in a table of torch layouts. Dtypes (``torch.float32``, ...) are accepted separately.
_METADATA_OBJECTS = (
    dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta, dcp_metadata.TensorStorageMetadata,
    dcp_metadata.BytesStorageMetadata, dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties,
    dcp_metadata._MEM_FORMAT_ENCODING, dcp_filesystem._StorageInfo,
    dcp_planner.SavePlan, dcp_planner.WriteItem, dcp_planner.WriteItemType, dcp_planner.TensorWriteData,
    torch.Size, torch.serialization._get_layout,
)
_METADATA_GLOBALS: Dict[Tuple[str, str], Any] = {(obj.__module__, obj.__qualname__): obj for obj in _METADATA_OBJECTS}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves the globals in ``_METADATA_GLOBALS`` and torch dtypes; refuses every other global.

    Globals are the only way a pickle reaches a callable (GLOBAL, STACK_GLOBAL and the copyreg
    extension opcodes all go through ``find_class``), so with only these data classes, enums and
    dtypes reachable, unpickling can build objects of these types and do nothing else. Allowed
    objects are returned from the table, never imported by name: importing a module named in the
    file could itself run code."""

    def __init__(self, file, label: str):
        super().__init__(file)
        self.label = label

    def find_class(self, module: str, name: str) -> Any:
        allowed = _METADATA_GLOBALS.get((module, name))
        if allowed is None and module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = getattr(torch, name)
        if allowed is None:
            raise _not_allowed(self.label, f"{module}.{name}")
        return allowed


def read_metadata_file(path: str) -> dcp_metadata.Metadata:
    """The DCP ``Metadata`` in file ``path``, unpickled by ``_MetadataUnpickler`` and checked.

    Raises UnsafeCheckpointError for a file that names a disallowed global or points
    outside its folder, and ValueError for one that is not DCP metadata at all."""
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # a malformed pickle can fail in many ways; all mean "not readable"
            raise ValueError(f"{_printable(path, 1000)}: not readable checkpoint metadata "
                             f"({type(e).__name__}: {_printable(str(e))})") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise ValueError(f"{_printable(path, 1000)}: not checkpoint metadata (holds a {type(metadata).__name__})")
    _check_storage_paths(metadata, path)
    return metadata


def _check_storage_paths(metadata: dcp_metadata.Metadata, path: str) -> None:
    """Every data file the metadata names must be a plain file name in the checkpoint folder.

    DCP joins these names to the folder, so ``../`` or an absolute path would make the loader
    read files outside the checkpoint. DCP itself writes flat names (``__0_1.distcp``)."""
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name:
            raise _refusal(path, f"it names data file {_printable(repr(name))} outside the checkpoint folder")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's FileSystemReader with ``.metadata`` read by ``read_metadata_file`` (parsed once per reader).

    Use it as the ``storage_reader`` of ``torch.distributed.checkpoint.load``, with a planner
    whose ``load_bytes`` is safe too (``SafeLoadPlanner``), or through ``dcp_load``."""

    def __init__(self, path, *args, **kwargs):
        super().__init__(path, *args, **kwargs)
        self._parsed: Dict[Optional[int], dcp_metadata.Metadata] = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        # ``rank``: DCP falls back to a rank's own ``__<rank>.metadata`` when the global file is missing.
        rank = kwargs.get("rank")
        if rank not in self._parsed:
            name = _METADATA_FILE if rank is None else f"__{int(rank)}{_METADATA_FILE}"
            self._parsed[rank] = read_metadata_file(os.path.join(str(self.path), name))
        metadata = self._parsed[rank]
        # What FileSystemReader.read_metadata does after unpickling: tag the metadata with this load.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------------------------------------------------
# bytes items and common.pt: torch.load(weights_only=True)

def _numpy_globals() -> list:
    """What ``np.random.get_state()`` (in our RNG state) needs beyond torch's weights_only defaults.

    A uint32 ndarray pickles as numpy's ``_reconstruct`` (module ``numpy.core.multiarray``
    under numpy 1, ``numpy._core.multiarray`` under numpy 2: both names, so that a checkpoint
    written under either loads), ``ndarray``, ``dtype``, and the class of the uint32 dtype,
    whose instance torch's unpickler must be allowed to build."""
    reconstruct = np.ndarray((0,), np.uint32).__reduce__()[0]  # numpy's own, found without naming its module
    return [(reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_NUMPY_GLOBALS = _numpy_globals()
_GLOBAL_RE = re.compile(r"GLOBAL (\S+?) (?:was not an allowed global|whose module)")
_REASON_RE = re.compile(r"WeightsUnpickler error: ([^\n]*)")


def _weights_only_refusal(label: str, error: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """A one-line refusal from torch's multi-line weights_only error: the global it names, else its reason."""
    text = str(error)
    named = _GLOBAL_RE.search(text)
    if named:  # torch drops the "builtins." of builtins (``exec``): put it back, as the .metadata refusal says it
        name = named.group(1)
        return _not_allowed(label, name if "." in name else f"builtins.{name}")
    reason = _REASON_RE.search(text)
    return _refusal(label, _printable(reason.group(1) if reason else text.strip().splitlines()[0]))


def load_weights_only(source, label: str, map_location=None) -> Any:
    """``torch.load(source, weights_only=True)`` with the numpy objects of ``_NUMPY_GLOBALS`` allowed.

    ``weights_only`` is passed explicitly: only then does torch ignore TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD.
    ``label`` names the file (and item) in the UnsafeCheckpointError raised for anything else."""
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights_only refusals, and pickles it cannot parse
        raise _weights_only_refusal(label, e) from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's DefaultLoadPlanner with bytes items loaded by ``load_weights_only``.

    ``checkpoint_dir`` only names the file in error messages."""

    def __init__(self, checkpoint_dir, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checkpoint_dir = str(checkpoint_dir)

    def load_bytes(self, read_item, value) -> None:
        fqn = read_item.dest_index.fqn
        value = load_weights_only(value, self._item_label(read_item))
        # Where DefaultLoadPlanner.load_bytes puts the object (torch 2.13).
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], value)
        else:
            self.state_dict[fqn] = value

    def _item_label(self, read_item) -> str:
        info = (self.metadata.storage_data or {}).get(read_item.storage_index) if self.metadata else None
        name = getattr(info, "relative_path", "?")
        return f"{os.path.join(self.checkpoint_dir, name)} (item {read_item.storage_index.fqn})"


def dcp_load(state_dict: dict, checkpoint_dir, planner: SafeLoadPlanner, **kwargs) -> SafeFileSystemReader:
    """``torch.distributed.checkpoint.load`` through a SafeFileSystemReader; returns the reader.

    The metadata is read here first so that a refusal is raised as itself: inside DCP a failing
    ``read_metadata`` is logged and retried with other files, and per-rank failures come back
    wrapped in a CheckpointException, from which a refusal on any rank is re-raised on every rank."""
    if not isinstance(planner, SafeLoadPlanner):
        raise TypeError("dcp_load needs a SafeLoadPlanner: other planners unpickle bytes items unrestricted")
    reader = SafeFileSystemReader(checkpoint_dir)
    reader.read_metadata()
    try:
        dcp.load(state_dict, storage_reader=reader, planner=planner, **kwargs)
    except CheckpointException as e:
        for exc, _trace in e.failures.values():
            if isinstance(exc, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(exc)) from None
        raise
    return reader


# ---------------------------------------------------------------------------------------------------------------
# megatron-core strategies built on the above

class _SafeMCoreLoadPlanner(SafeLoadPlanner, mcore_torch.MCoreLoadPlanner):
    """megatron-core's planner (global shape checks) with SafeLoadPlanner's ``load_bytes``."""


class _SafeTorchDistLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
    """megatron-core's torch_dist load strategy reading through SafeFileSystemReader and _SafeMCoreLoadPlanner.

    ``TorchDistLoadShardedStrategy.load`` builds its reader and planner inside itself, so ``load``
    takes the same steps as megatron-core 0.16.1's with those two replaced (from its own helpers)."""

    def load(self, sharded_state_dict, checkpoint_dir):
        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        checked_shapes = [t for t in tensors if not t.allow_shape_mismatch]
        loose_shapes = {t.key: t for t in tensors if t.allow_shape_mismatch}
        flat, flat_mapping, rename_mapping = mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
        pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(flat, True)
        planner = _SafeMCoreLoadPlanner(checkpoint_dir, shapes_validation_sharded_tensors=checked_shapes,
                                        allow_shape_mismatch_sharded_tensors=loose_shapes)
        reader = dcp_load(pyt_state_dict, checkpoint_dir, planner)
        self.cached_global_metadata = reader.read_metadata()  # as megatron-core keeps it (parsed once)
        unwrapped = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        loaded = mcore_torch._replace_sharded_keys_with_state_dict_keys(unwrapped, flat_mapping, rename_mapping)
        mcore_torch._restore_dict_types(loaded, sharded_state_dict)
        return loaded

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        return super().load_tensors_metadata(
            checkpoint_dir, metadata or SafeFileSystemReader(checkpoint_dir).read_metadata())

    def load_sharded_metadata(self, checkpoint_dir):
        # megatron-core's version reads the metadata with the stock reader; same result, read safely.
        metadata = SafeFileSystemReader(checkpoint_dir).read_metadata()
        sharded = {}
        for key, stored in metadata.state_dict_metadata.items():
            if isinstance(stored, dcp_metadata.BytesStorageMetadata):
                obj = ShardedObject.empty_from_unique_key(key)
                sharded[obj.unique_key] = obj
        sharded.update(self.load_tensors_metadata(checkpoint_dir, metadata))
        return sharded

    def check_backend_compatibility(self, loaded_backend):
        if loaded_backend != "torch_dist":
            raise CheckpointingException(f"sharded backend {loaded_backend!r}: only torch_dist checkpoints are loaded")


class _SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """megatron-core's common strategy with ``common.pt`` read by ``load_weights_only``."""

    def load_common(self, checkpoint_dir):
        path = os.path.join(str(checkpoint_dir), COMMON_STATE_FNAME)
        if not os.path.isfile(path):
            raise CheckpointingException(f"Common file {path} does not exist")
        return load_weights_only(path, path, map_location="cpu")

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        # Only for sharded strategies that cannot load ShardedObjects; torch_dist keeps them in its
        # .distcp files and _SafeTorchDistLoadStrategy loads them, so the unchecked per-object
        # .pt files of the old layout are never read.
        raise CheckpointingException(f"{checkpoint_dir}: ShardedObjects outside the torch_dist files are not loaded")

    def check_backend_compatibility(self, loaded_backend):
        if loaded_backend != "torch":
            raise CheckpointingException(f"common backend {loaded_backend!r}: only torch common state is loaded")


def load(sharded_state_dict, checkpoint_dir: str):
    """``megatron.core.dist_checkpointing.load(sharded_state_dict, checkpoint_dir)``, without running code
    from the checkpoint: same arguments, same return value; UnsafeCheckpointError for a file it refuses."""
    return dist_checkpointing.load(sharded_state_dict, str(checkpoint_dir),
                                   sharded_strategy=_SafeTorchDistLoadStrategy(),
                                   common_strategy=_SafeCommonLoadStrategy())
