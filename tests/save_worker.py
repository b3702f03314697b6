"""A one-process save under conditions that used to hang it (tests/test_save_bounded.py):

- ``fork-lock``: 64 live threads, one of them holding a lock for good, and a fork handler that takes that
  lock, so a process forked from here blocks forever (as a writer did that was forked while another thread
  held a lock);
- ``stuck-writer``: the shard writer itself never returns (a file system that stopped answering).

Usage: python tests/save_worker.py MODE OUTPUT_DIR TIMEOUT_S
"""
from __future__ import annotations

import os
import sys
import threading
import time

import torch
import torch.distributed as dist


def live_threads(n: int) -> threading.Lock:
    held, stop = threading.Lock(), threading.Event()

    def holder():
        with held:
            stop.wait()

    for i in range(n):
        threading.Thread(target=holder if i == 0 else lambda: stop.wait(), daemon=True).start()
    while not held.locked():
        time.sleep(0.001)
    return held


def main(mode: str, out: str, timeout_s: float) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from megatron_swift.backend import cpu_compat
    from megatron_swift.backend.device import _free_port
    from megatron_swift.training import checkpoint

    cpu_compat.apply()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    if mode == "fork-lock":
        held = live_threads(64)
        os.register_at_fork(after_in_child=held.acquire)  # in a forked child nobody will ever release it
    elif mode == "stuck-writer":
        FileSystemWriterAsync.write_preloaded_data = staticmethod(lambda *a, **k: threading.Event().wait())
    weights = {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", torch.arange(64.0).reshape(8, 8) + i)
               for i in range(4)}
    path = checkpoint._write(out, 1, lambda: weights, "x: 1\n", {"iteration": 1}, 2, timeout_s)
    print(f"saved {path}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
