"""Run under torchrun: one training step, then this rank's real allocation next to the planner's estimate.

usage: plan_worker.py <result.json> <override> [<override> ...]
Writes [{"rank", "stage", "measured": {...}, "planned": {...}}] for every rank (from rank 0).
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_swift.config.compose import compose
    from megatron_swift.models.builder import resolve_precision
    from megatron_swift.plan.measure import allocated
    from megatron_swift.plan.memory import layout_of, rank_memory
    from megatron_swift.training.loop import setup

    result_file, overrides = sys.argv[1], sys.argv[2:]
    cfg = compose(overrides)
    trainer = setup(cfg)
    trainer.fit()  # Adam's state exists after the first step
    trainer.sinks.close()
    stage = ps.get_pipeline_model_parallel_rank()
    plan = rank_memory(trainer.arch, trainer.model_meta["padded_vocab_size"], layout_of(cfg, dist.get_world_size()),
                       cfg.train.seq_length, resolve_precision(cfg.train.precision, trainer.backend), stage)
    mine = {"rank": dist.get_rank(), "stage": stage, "measured": allocated(trainer.model, trainer.optimizer),
            "planned": {"params": plan.params, "weights": plan.weights, "grads": plan.grads,
                        "optimizer": plan.optimizer}}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    if dist.get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
