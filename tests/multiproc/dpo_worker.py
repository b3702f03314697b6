"""Run under torchrun: train with task=dpo, then check the reference against a fresh load of its source.

usage: dpo_worker.py <result.json> <override> [<override> ...]
       dpo_worker.py <result.json> --tasks=cpo,simpo,gkd@data=sft@... <out dir> <override> [<override> ...]
The second form trains each task in turn in this one torchrun job (metrics in <out dir>/<task>), so a layout
check of several tasks pays for one launch.
Writes {"reference_unchanged": bool, "reference_params": n} from rank 0: a separate reference model's
weights are bitwise those of a fresh load; a LoRA policy's reference (the policy with its adapters
disabled) gives the fresh model's log-probabilities on the first pairs of the data.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _same_weights(fresh, reference) -> tuple:
    import torch

    pairs = [(a, b) for chunk, ref in zip(fresh, reference) for a, b in zip(chunk.parameters(), ref.parameters())]
    return float(all(torch.equal(a, b) for a, b in pairs)), len(pairs)


def _same_logps(task, fresh, data, device) -> tuple:
    from megatron.core import parallel_state as ps

    batches = [data.collate([data[i] for i in range(k, k + task.micro_batch_size)]).to(device) for k in (0, 2)]
    task._reference_logps(batches)  # the policy with its adapters disabled
    policy_base = [b.ref_logps for b in batches]
    task.reference, task.policy = fresh, None
    task._reference_logps(batches)  # the freshly loaded base model
    if not ps.is_pipeline_last_stage():
        return 1.0, 0
    diff = max((a - b.ref_logps).abs().max().item() for a, b in zip(policy_base, batches))
    return float(diff < 1e-5), len(batches)


def _each_task(tasks: str, out: str, overrides) -> None:
    """``tasks``: comma-separated ``task[@key=value...]``; a task's own settings replace the shared ones with
    the same key (e.g. ``gkd@data=sft@task.teacher.model=...``)."""
    from megatron.core import parallel_state as ps

    from tests.multiproc.trained import trained

    for item in tasks.split(","):
        task, *own = item.split("@")
        keys = {o.split("=", 1)[0] for o in own}
        shared = [o for o in overrides if o.split("=", 1)[0] not in keys]
        folder = [] if "train.output_dir" in keys else [f"train.output_dir={os.path.join(out, task)}"]
        trained([*shared, *own, f"task={task}", *folder])
        ps.destroy_model_parallel()  # the next task's setup makes the groups again


def main() -> None:
    if sys.argv[2].startswith("--tasks="):
        return _each_task(sys.argv[2].split("=", 1)[1], sys.argv[3], sys.argv[4:])
    import torch
    import torch.distributed as dist

    from megatron_swift.tasks.reference import build_reference
    from tests.multiproc.trained import trained, write_json

    result_file = sys.argv[1]
    cfg, trainer = trained(sys.argv[2:])
    fresh = build_reference(cfg, trainer.backend, trainer.arch, trainer.model_meta["padded_vocab_size"])
    if trainer.task.policy is not None:
        same, checked = _same_logps(trainer.task, fresh, trainer.train_data, trainer.backend.torch_device)
    else:
        same, checked = _same_weights(fresh, trainer.task.reference)
    result = torch.tensor([same, float(checked)])
    dist.all_reduce(result[:1], op=dist.ReduceOp.MIN)
    dist.all_reduce(result[1:], op=dist.ReduceOp.MAX)
    write_json(result_file, {"reference_unchanged": bool(result[0].item()),
                             "reference_params": int(result[1].item())}, rank=0)


if __name__ == "__main__":
    main()
