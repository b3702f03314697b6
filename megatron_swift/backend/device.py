"""Device and process-group setup: CUDA+NCCL (Transformer Engine when importable) or CPU+gloo."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import psutil
import torch
import torch.distributed as dist

# Dense (not 2:4 sparse) BF16 tensor-core peak per device, used only for MFU, from NVIDIA's data sheets.
# Keys are substrings of torch.cuda.get_device_name(), most specific first: the PCIe and NVL cards of a
# generation run at lower clocks and power than its SXM parts. Unknown GPUs report no MFU rather than a guess.
_PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0),
    ("H100", 989.0), ("H200", 989.0),  # SXM ("NVIDIA H100 80GB HBM3", "NVIDIA H200")
    ("A100", 312.0), ("L40S", 362.0), ("B200", 2250.0),
)


def te_available() -> bool:
    """True when Transformer Engine imports (it needs CUDA)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a CUDA/driver error raised at import
        return False
    return True


def resolve_device(requested: str) -> str:
    """``auto`` means CUDA when torch sees a GPU, else CPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no GPU; use train.device=cpu or auto")
    return requested


@dataclass
class Backend:
    """What the rest of the code may ask about the device."""

    device: str
    """``cuda`` or ``cpu``."""
    use_te: bool
    """Build layers from Transformer Engine specs (else megatron-core local specs)."""
    attention: str = "local"
    """Core attention backend (te, sdpa, local), resolved by the attention seam (models.attention)."""
    wgrad_fusion: bool = False
    """Linears add weight gradients into the fp32 main grads inside the GEMM (gradient_accumulation_fusion;
    CUDA without TE through backend.no_apex)."""
    fused_cross_entropy: bool = False
    """megatron-core's fused vocab-parallel cross-entropy (compiled by torch.compile on first use; CUDA)."""

    @property
    def torch_device(self) -> torch.device:
        if self.device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def batch_p2p_comm(self) -> bool:
        """Batched pipeline send/recv. With interleaved PP=2 both neighbours are the
        same rank, and gloo matches untagged messages between a pair in posting
        order: the batched order (send_prev, recv_prev, send_next, recv_next)
        then pairs activations with gradients. megatron-core's unbatched path
        orders ops by even/odd rank, which matches. NCCL keeps the batched path."""
        return self.device == "cuda"

    @property
    def packed_format(self) -> str:
        """How packed rows keep samples apart under this run's attention (models.attention.packed_format)."""
        from megatron_swift.models.attention import packed_format

        return packed_format(self.attention)

    def memory_gib(self) -> float:
        """Memory of this process: the CUDA allocator peak so far, or the CPU resident set now."""
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        # Current, not peak, on CPU: large tensors are returned to the OS when freed, so this is what
        # the process holds now (the peak RSS would keep set-up transients such as a freed model).
        return psutil.Process().memory_info().rss / 2**30

    def peak_tflops(self) -> float | None:
        """Dense BF16 peak of this device for MFU; None where unknown (CPU included)."""
        if self.device != "cuda":
            return None
        name = torch.cuda.get_device_name()
        return next((v for k, v in _PEAK_BF16_TFLOPS if k in name), None)

    def device_name(self) -> str:
        """What the run is on, for reports (the GPU's name, or cpu)."""
        return torch.cuda.get_device_name() if self.device == "cuda" else "cpu"

    def fusions(self) -> str:
        """The fused paths on for this run without TE, for the start line ("" when none)."""
        on = [name for name, flag in (("wgrad-accumulation", self.wgrad_fusion),
                                      ("cross-entropy", self.fused_cross_entropy)) if flag]
        return f", fused {' + '.join(on)}" if on else ""

    def synchronize(self) -> None:
        """Wait for queued device work so wall-clock timings are real."""
        if self.device == "cuda":
            torch.cuda.synchronize()


def collective_device() -> torch.device:
    """Where tensors handed to collectives of the default process group must live: the current GPU under
    NCCL, the CPU under gloo. Code that builds a small tensor just to reduce it (a flag, a count) asks here."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(requested_device: str = "auto", timeout_minutes: int = 30, attention: str = "auto") -> Backend:
    """Create the default process group for this rank (env:// from torchrun or SLURM) and return the backend;
    ``attention`` is model.attention_backend (resolved by the attention seam)."""
    from megatron_swift.models.attention import resolve

    from megatron_swift.backend import no_apex, no_grad_paths

    device = resolve_device(requested_device)
    no_apex.apply()
    no_grad_paths.apply(skinny_products=device == "cpu")  # an MKL dispatch quirk, see no_grad_paths
    if device == "cpu":
        from megatron_swift.backend import cpu_compat

        cpu_compat.apply()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _init_process_group("nccl" if device == "cuda" else "gloo", timeout_minutes)
    use_te = device == "cuda" and te_available()
    cuda_local = device == "cuda" and not use_te  # the TE path keeps its own fusions (not measured here)
    wgrad = cuda_local and no_apex.install_wgrad_accumulation(torch.device("cuda", torch.cuda.current_device()))
    return Backend(device=device, use_te=use_te, attention=resolve(attention, use_te), wgrad_fusion=wgrad,
                   fused_cross_entropy=cuda_local)


def _init_process_group(backend: str, timeout_minutes: int) -> None:
    if dist.is_initialized():
        return
    # A plain `python launch/train.py` is a world of one: give it a rendezvous.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
