"""The one place that knows which device the run is on.

``init`` picks CUDA+NCCL or CPU+gloo, installs the CPU compatibility patches
when needed, and returns a :class:`Backend` that the rest of the code asks for
layer specs, memory figures and peak FLOP/s instead of branching on the device.
"""
from megatron_swift.backend.device import Backend, collective_device, init, resolve_device  # noqa: F401
