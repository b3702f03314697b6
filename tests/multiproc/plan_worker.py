"""Run under torchrun: one training step, then this rank's real allocation next to the planner's estimate.

usage: plan_worker.py <result.json> <override> [<override> ...]
Writes [{"rank", "stage", "measured": {...}, "planned": {...}}] for every rank (from rank 0). A held vision tower
(Arch.vision_hf) adds "tower_activations": the most bytes autograd kept through it in one micro-batch
(plan.measure.SavedTensors), and the planner's count.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def watch_towers(model) -> list:
    """Hooks on every HeldTower of ``model``: the bytes autograd saves in each of its forwards (parameters apart),
    appended to the returned list."""
    from megatron_swift.models.held_tower import HeldTower
    from megatron_swift.plan.measure import SavedTensors

    seen, active = [], {}

    def enter(module, args, kwargs):
        active[module] = SavedTensors(module.parameters()).__enter__()

    def leave(module, args, kwargs, output):
        saved = active.pop(module)
        saved.__exit__(None, None, None)
        seen.append(saved.bytes)

    for tower in (m for chunk in model for m in chunk.modules() if isinstance(m, HeldTower)):
        tower.register_forward_pre_hook(enter, with_kwargs=True)
        tower.register_forward_hook(leave, with_kwargs=True)
    return seen


def main() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_swift.config.compose import compose
    from megatron_swift.models.builder import resolve_precision
    from megatron_swift.plan.measure import allocated
    from megatron_swift.plan.memory import layout_of, rank_memory, tower_activation_bytes
    from megatron_swift.training.loop import setup
    from tests.multiproc.trained import write_json

    result_file = sys.argv[1]
    cfg = compose(sys.argv[2:])
    trainer = setup(cfg)
    towers = watch_towers(trainer.model)
    trainer.fit()  # Adam's state exists after the first step
    trainer.sinks.close()
    stage = ps.get_pipeline_model_parallel_rank()
    precision = resolve_precision(cfg.train.precision, trainer.backend)
    layout = layout_of(cfg, dist.get_world_size(), trainer.arch)
    plan = rank_memory(trainer.arch, trainer.model_meta["padded_vocab_size"], layout, cfg.train.seq_length, precision,
                       stage)
    mine = {"rank": dist.get_rank(), "stage": stage, "measured": allocated(trainer.model, trainer.optimizer),
            "planned": {"params": plan.params, "weights": plan.weights, "grads": plan.grads,
                        "optimizer": plan.optimizer}}
    if towers:
        mine["measured"]["tower_activations"] = max(towers)
        mine["planned"]["tower_activations"] = tower_activation_bytes(trainer.arch, layout, precision)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, mine)
    write_json(result_file, rows, rank=0)


if __name__ == "__main__":
    main()
