"""Disk space for a checkpoint: checked before writing, and a disk that fills while writing is one line.

Before a save every rank compares the free space of the checkpoint folder with what the checkpoint
needs: the size of the newest complete checkpoint of the run when there is one (the same model and
optimizer: exact), else the bytes of the tensors about to be written, summed over the ranks. A short
disk stops the run with :class:`NoSpace` before anything is written (every rank agrees, so no rank
waits in a collective for one that gave up), the previous checkpoints untouched. A disk that fills up
during the write anyway (another job wrote to it) surfaces from the writer threads as ``OSError``
ENOSPC/EDQUOT, wrapped by megatron-core and DCP; ``is_no_space`` finds it in the chain (or, once DCP
has pickled it across ranks, in the text).
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megatron_swift.backend import collective_device
from megatron_swift.training import ckpt_store
from megatron_swift.training.errors import NoSpace

_MARGIN = 1.05  # metadata, common.pt and file-system overhead on top of the tensors
_MB = 1 << 20


def _tensor_bytes(sharded) -> int:
    """Bytes of the tensors this rank writes (main replicas of sharded tensors, plain tensors)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    total = 0
    for value in nested_values(sharded):
        data = value if isinstance(value, torch.Tensor) else getattr(value, "data", None)
        if isinstance(data, torch.Tensor) and is_main_replica(getattr(value, "replica_id", 0)):
            total += data.numel() * data.element_size()
    return total


def _previous_size(ckpt_dir: str) -> Optional[int]:
    found = ckpt_store.complete_checkpoints(ckpt_dir)
    if not found:
        return None
    manifest = ckpt_store.read_meta(found[-1]).get("manifest")
    return sum(size for size, _ in manifest.values()) if isinstance(manifest, dict) else None


def check(ckpt_dir: str, sharded, iteration: int) -> None:
    """Raise NoSpace on every rank when a rank's file system cannot hold the checkpoint (collective)."""
    estimate = torch.tensor([_tensor_bytes(sharded)], dtype=torch.float64, device=collective_device())
    dist.all_reduce(estimate)
    needed = int(_MARGIN * (_previous_size(ckpt_dir) or estimate.item()))
    free = free_bytes(ckpt_dir)
    short = torch.tensor([float(free < needed)], device=collective_device())
    dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if short.item():
        raise NoSpace(message(ckpt_dir, iteration, needed, free))


def free_bytes(path: str) -> int:
    """Free bytes of the file system that holds ``path`` (or will: its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def message(ckpt_dir: str, iteration: int, needed: Optional[int], free: int) -> str:
    need = f"needs about {needed / _MB:.0f} MB" if needed else "did not fit"
    return (f"no space left on {ckpt_dir}: the checkpoint of step {iteration} {need}, {free / _MB:.0f} MB free; "
            "the previous checkpoints are kept. Free some space (or lower train.keep_last) and run the same "
            "command to continue")


def is_no_space(error: BaseException) -> bool:
    """Whether ENOSPC/EDQUOT is anywhere in the error's chain (causes, contexts, DCP's per-rank failures)."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(os.strerror(n) in str(e) for n in (errno.ENOSPC, errno.EDQUOT)):  # DCP gathers failures
            return True  # pickled across ranks, which drops their causes: the OSError lives on in the text
        todo += [e.__cause__, e.__context__]
        todo += [failure[0] for failure in (getattr(e, "failures", None) or {}).values()]
    return False
