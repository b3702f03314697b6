"""Run under torchrun: one training step, then this rank's real allocation next to the planner's estimate.

usage: plan_worker.py <result.json> <override> [<override> ...]
Writes [{"rank", "stage", "measured": {...}, "planned": {...}}] for every rank (from rank 0).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_swift.models.builder import resolve_precision
    from megatron_swift.plan.measure import allocated
    from megatron_swift.plan.memory import layout_of, rank_memory
    from tests.multiproc.trained import trained, write_json

    result_file = sys.argv[1]
    cfg, trainer = trained(sys.argv[2:])  # Adam's state exists after the first step
    stage = ps.get_pipeline_model_parallel_rank()
    plan = rank_memory(trainer.arch, trainer.model_meta["padded_vocab_size"], layout_of(cfg, dist.get_world_size()),
                       cfg.train.seq_length, resolve_precision(cfg.train.precision, trainer.backend), stage)
    mine = {"rank": dist.get_rank(), "stage": stage, "measured": allocated(trainer.model, trainer.optimizer),
            "planned": {"params": plan.params, "weights": plan.weights, "grads": plan.grads,
                        "optimizer": plan.optimizer}}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    write_json(result_file, rows, rank=0)


if __name__ == "__main__":
    main()
