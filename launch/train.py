"""Train a model: `torchrun --nproc_per_node N launch/train.py +model=<family> [key=value ...]`.

The whole run is described by the composed Hydra config (conf/); the loop is
megatron_swift/training/loop.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Unexpected failures should show their whole traceback, not Hydra's one-line summary.
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import hydra  # noqa: E402

from megatron_swift.cli import run_or_exit  # noqa: E402
from megatron_swift.config.compose import check_composes, normalize_overrides  # noqa: E402
from megatron_swift.config.schema import register  # noqa: E402

register()
sys.argv[1:] = normalize_overrides(sys.argv[1:])  # regexes as typed, one value for a list key
run_or_exit(check_composes, sys.argv[1:])  # an unknown key or option: one line, exit 2


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg) -> None:
    from megatron_swift.cli import run_or_exit
    from megatron_swift.training.loop import run

    run_or_exit(run, cfg)


if __name__ == "__main__":  # dist_checkpointing starts worker processes: keep the guard
    main()
