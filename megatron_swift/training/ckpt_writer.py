"""megatron-core 0.16.1 workaround: checkpoint shards are written by threads of the rank, never by forked
processes.

megatron-core's torch_dist saver (``dist_checkpointing/strategies/filesystem_async.py``,
``FileSystemWriterAsync.write_preloaded_data_multiproc``) writes each rank's shards from children
started with ``mp.get_context("fork")``, even for a synchronous save, where the function runs in the
rank itself. A training rank has dozens of threads (torch's intra-op pool, gloo, data readers, wandb);
``fork`` copies only the calling thread, so any lock another thread held at that moment (the
allocator's, logging's, a C library's) stays locked for good in the child. One save in about a hundred
hung that way, with nothing to time it out. Writing from threads of the rank cannot inherit a lock
nobody will release, and the same megatron-core function (``write_preloaded_data``) still writes each
file, so the files are the same.

The saver also collects the writers' results through a queue that it gets, on the first save, from a
``multiprocessing.Manager`` process started with "spawn" (meant for asynchronous saves). This project
saves synchronously: an in-process ``queue.Queue`` is put into the module's ``_results_queue`` slot
(which ``_get_write_results_queue`` then returns), so no helper process exists at all, and the first
save does not wait about 1.8 s for one to start and import torch.

Checked against megatron-core 0.16.1; ``install`` replaces the method by name and stops with an error
if a later version no longer has it.
"""
from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

_installed = False


def _write_in_threads(transform_list, use_msc: bool, rank: int, write_buckets: List, global_results_queue) -> None:
    """``write_preloaded_data_multiproc``'s contract (one dict {bucket index: write results}, or the first
    exception, put on ``global_results_queue``) with one thread per bucket instead of one forked process."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    local_results: "queue.Queue" = queue.Queue()
    count: "queue.Queue" = queue.Queue()  # write_preloaded_data takes one item off it when done

    def write(i: int, bucket) -> None:
        count.put(i)
        kwargs = {"use_msc": use_msc} if use_msc else {}
        try:  # write_preloaded_data reports the failures of writing through local_results itself
            FileSystemWriterAsync.write_preloaded_data(transform_list, i, bucket, local_results, count, True,
                                                       **kwargs)
        except Exception as e:  # anything else too, so that every rank goes on to the collective error path
            local_results.put((i, e))

    with ThreadPoolExecutor(max_workers=max(1, len(write_buckets)), thread_name_prefix="ckpt-writer") as pool:
        for future in [pool.submit(write, i, b) for i, b in enumerate(write_buckets)]:
            future.result()
    results: Dict[int, list] = {}
    while not local_results.empty():
        index, result = local_results.get()
        if isinstance(result, Exception):
            global_results_queue.put(result)
            return
        results[index] = result
    global_results_queue.put(dict(sorted(results.items())))  # bucket order, whichever thread finished first


def install() -> None:
    """Make megatron-core's saver write in this process and collect results in-process (idempotent; call
    before saving)."""
    global _installed
    if _installed:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()  # sync saves: put and taken back by this rank
    writer = filesystem_async.FileSystemWriterAsync
    if not hasattr(writer, "write_preloaded_data_multiproc"):  # another megatron-core: look at it again
        raise RuntimeError("megatron-core's FileSystemWriterAsync has no write_preloaded_data_multiproc: "
                           "megatron_swift/training/ckpt_writer.py was written against 0.16.1")
    writer.write_preloaded_data_multiproc = staticmethod(_write_in_threads)
    _installed = True
