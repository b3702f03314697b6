"""Turn expected failures (bad config, bad data) into one clear message and exit code 2."""
from __future__ import annotations

import os
import sys
import time

from megatron_swift.config.validate import ConfigError
from megatron_swift.data.errors import DataError

EXIT_BAD_INPUT = 2
_PEER_GRACE_S = 5.0


def run_or_exit(fn, *args) -> None:
    """Call ``fn``; on a user error print it once (rank 0) and exit 2 without a traceback."""
    try:
        fn(*args)
    except (ConfigError, DataError) as e:
        # Every rank sees the same problem; rank 0 reports it. The others wait a
        # moment so that torchrun, which stops all ranks when the first one exits,
        # does not stop rank 0 before its message is out.
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron-swift: error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(_PEER_GRACE_S)
        sys.stderr.flush()
        os._exit(EXIT_BAD_INPUT)  # skip atexit hooks that could wait on peers that failed too
