"""Resume a finished run (nothing left to train) and report the Adam step of every parameter on rank 0.

    torchrun ... adam_state_worker.py <result.json> [train.device=cpu ...overrides]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup
    from tests.multiproc.trained import write_json

    result, overrides = sys.argv[1], [a for a in sys.argv[2:] if a != "train.device=cpu"] + ["train.device=cpu"]
    trainer = setup(compose(overrides))
    steps = [s["step"] for opt in trainer.optimizer.chained_optimizers for s in opt.optimizer.state.values()]
    write_json(result, {"values": sorted({float(s) for s in steps}), "count": len(steps),
                        "distinct": len({id(s) for s in steps})}, rank=0)
    trainer.sinks.close()


if __name__ == "__main__":
    main()
