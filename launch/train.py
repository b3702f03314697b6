"""Train a model: `torchrun --nproc_per_node N launch/train.py +model=<family> [key=value ...]`.

The whole run is described by the composed Hydra config (conf/); the loop is
megatron_swift/training/loop.py.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Unexpected failures should show their whole traceback, not Hydra's one-line summary.
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


def main() -> None:
    import hydra

    @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
    def train(cfg) -> None:
        from megatron_swift.cli import run_or_exit
        from megatron_swift.config.validate import precheck

        run_or_exit(precheck, cfg)  # config problems before the heavy imports below
        from megatron_swift.training.loop import run

        run_or_exit(run, cfg)

    train()


def check_command_line() -> None:
    from megatron_swift.cli import run_or_exit
    from megatron_swift.config.compose import check_composes, normalize_overrides
    from megatron_swift.config.schema import register

    register()
    sys.argv[1:] = normalize_overrides(sys.argv[1:])  # regexes as typed, one value for a list key
    run_or_exit(check_composes, sys.argv[1:])  # an unknown key or option: one line, exit 2


# Everything, imports included, runs under the guard: megatron-core's checkpoint saver starts a process with
# "spawn", which imports this file again (as __mp_main__); module-level work there cost seconds at the first save.
def print_help_if_asked() -> None:
    """--help / -h: our own help (choices, every setting with its documentation), fast: no Hydra, no torch."""
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        from megatron_swift.config.help import render

        sys.stdout.write(render([a for a in sys.argv[1:] if not a.startswith("-")]))
        sys.exit(0)


if __name__ == "__main__":
    print_help_if_asked()
    check_command_line()
    main()
    from megatron_swift.cli import exit_finished

    exit_finished()
