"""What the trainer really allocated on this rank: weights, DDP gradient buffers, optimizer state.

The ground truth the planner (plan.memory) is tested against, and what the memory benchmarks print."""
from __future__ import annotations

from typing import Dict


def tensor_bytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def optimizer_bytes(optimizer) -> int:
    """Adam state plus fp32 main parameters (bf16/fp16 runs), over every chained optimizer."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        total += sum(tensor_bytes(state) for state in opt.optimizer.state.values())
        main = getattr(opt, "shard_fp32_from_float16_groups", None) or getattr(opt, "fp32_from_float16_groups", None)
        total += tensor_bytes(main or [])
    return total


def allocated(model, optimizer) -> Dict[str, int]:
    """Bytes of this rank's weights, gradient buffers and optimizer state; trainable parameter count."""
    params = [p for chunk in model for p in chunk.parameters()]
    return {
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "weights": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(tensor_bytes(b.grad_data) for chunk in model
                     for b in list(chunk.buffers) + list(getattr(chunk, "expert_parallel_buffers", []))),
        "optimizer": optimizer_bytes(optimizer),
    }


class SavedTensors:
    """Bytes of the distinct storages autograd saves for backward while active (``with SavedTensors(skip) as s:``
    then ``s.bytes``), the tensors whose storages are in ``skip`` (parameters) left out: the activation memory
    of a forward pass, as the graph holds it until backward."""

    def __init__(self, skip=()):
        import torch

        self._skip = {p.untyped_storage().data_ptr() for p in skip}
        self._seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._skip:
            self._seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
