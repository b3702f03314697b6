"""Turn expected failures into one clear line per problem, ``megatron-swift: error: ...``, and an exit code.

Expected failures: bad config (ConfigError), bad data (DataError), an unusable
checkpoint (CheckpointError), a reward function that fails (RewardError) exit 2;
a run that diverged (Diverged) exits 3; a checkpoint save that does not finish in time exits 4
(training/save_deadline.py, which prints its own line).
Anything else is a bug and keeps its traceback.

Under torchrun the launcher prints its own failure report after the workers
exit. Each failing worker also writes its line to the error file torchrun gives
it (``TORCHELASTIC_ERROR_FILE``), so the report's "Root Cause" shows that line
instead of a pointer to the docs. (torchrun itself exits 1 whatever the
worker's code; run without torchrun, the process exits 2 or 3.)
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import List

from megatron_swift.config.validate import ConfigError
from megatron_swift.data.errors import DataError
from megatron_swift.rewards.registry import RewardError
from megatron_swift.training.errors import CheckpointError, Diverged

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
_PEER_GRACE_S = 2.0


def error_lines(error: Exception) -> List[str]:
    """The lines to print for an expected failure: one per problem."""
    problems = error.problems if isinstance(error, ConfigError) else [str(error)]
    return [f"megatron-swift: error: {' '.join(str(p).split())}" for p in problems]


def _write_error_file(lines: List[str]) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:
            text = "\n".join(lines)  # torchrun's report prints py_callstack as the failure's "traceback"
            json.dump({"message": {"message": text, "extraInfo": {"py_callstack": text,
                                                                  "timestamp": str(int(time.time()))}}}, f)
    except OSError:  # the report then falls back to its generic text; the printed line is what matters
        pass


def run_or_exit(fn, *args) -> None:
    """Call ``fn``; on an expected failure print it (rank 0) and exit without a traceback."""
    try:
        fn(*args)
    except (ConfigError, DataError, CheckpointError, Diverged, RewardError) as e:
        lines = error_lines(e)
        _write_error_file(lines)
        # Every rank usually sees the same problem; rank 0 reports it. The others wait a moment so that
        # torchrun, which stops all ranks when the first one exits, does not stop rank 0 before its line is out.
        # A problem only one rank can see (a reward function failing on its completions) is reported there.
        if os.environ.get("RANK", "0") == "0" or getattr(e, "rank_local", False):
            print("\n".join(lines), file=sys.stderr, flush=True)
        else:
            time.sleep(_PEER_GRACE_S)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_DIVERGED if isinstance(e, Diverged) else EXIT_BAD_INPUT)  # skip atexit hooks on peers


def exit_finished() -> None:
    """End a finished run at once: exit handlers run and output is flushed, then the process exits without the
    interpreter's teardown of every module (about 1.3 s per rank for torch and megatron-core; collective
    libraries' destructors can also hang there). Everything the run writes is closed before this."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
