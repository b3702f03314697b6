"""A checkpoint save that does not finish in time ends the rank with one line instead of hanging for good.

A save waits on things no timeout of ours covers: a writer stuck on a file system that stopped answering,
a rank stuck inside megatron-core. The other ranks then wait in a collective until gloo/NCCL gives up
(cluster.dist_timeout_minutes), and the stuck rank itself would wait forever. The deadline is a timer
thread: when it fires the rank prints one line, writes the stacks of all its threads to a file in the run
folder (what was stuck), and exits at once. The main thread may be blocked in C code, where no Python
exception can reach it, so exiting the process is the only way out. The checkpoint being written is a
``.tmp.iter_N`` folder, never taken for a complete one; the previous checkpoints are untouched.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

EXIT_SAVE_STUCK = 4


def _give_up(seconds: float, what: str, stacks_path: str) -> None:
    where = "(stacks of its threads were not written)"
    try:
        with open(stacks_path, "w", encoding="utf-8") as f:
            faulthandler.dump_traceback(file=f, all_threads=True)
        where = f"(stacks of its threads: {stacks_path})"
    except OSError:
        pass
    line = (f"megatron-swift: error: {what} did not finish in {seconds:.0f} s (cluster.dist_timeout_minutes): "
            f"a checkpoint writer or the file system is stuck; rank {os.environ.get('RANK', '0')} stops {where}; "
            "the previous checkpoints are intact")
    from megatron_swift.cli import _write_error_file  # torchrun's report names this line as the root cause

    _write_error_file([line])
    print(line, file=sys.stderr, flush=True)
    os._exit(EXIT_SAVE_STUCK)


@contextmanager
def bounded(seconds: float, what: str, stacks_path: str) -> Iterator[None]:
    """Run the body; if it is still running after ``seconds``, end this process with one line naming
    ``what`` (see the module docstring)."""
    timer = threading.Timer(seconds, _give_up, args=(seconds, what, stacks_path))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
