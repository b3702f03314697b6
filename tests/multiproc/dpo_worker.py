"""Run under torchrun: train with task=dpo, then check the reference model against a fresh load of its source.

usage: dpo_worker.py <result.json> <override> [<override> ...]
Writes {"reference_unchanged": bool, "reference_params": n} from rank 0.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch
    import torch.distributed as dist

    from megatron_swift.config.compose import compose
    from megatron_swift.tasks.reference import build_reference
    from megatron_swift.training.loop import setup

    result_file, overrides = sys.argv[1], sys.argv[2:]
    cfg = compose(overrides)
    trainer = setup(cfg)
    trainer.fit()
    trainer.sinks.close()
    fresh = build_reference(cfg, trainer.backend, trainer.arch, trainer.model_meta["padded_vocab_size"])
    pairs = [(a, b) for chunk, ref in zip(fresh, trainer.task.reference)
             for a, b in zip(chunk.parameters(), ref.parameters())]
    same = torch.tensor(float(all(torch.equal(a, b) for a, b in pairs)))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    if dist.get_rank() == 0:
        with open(result_file, "w") as f:
            json.dump({"reference_unchanged": bool(same.item()), "reference_params": len(pairs)}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
