"""Run under torchrun: train with task=rm (train.save_hf exports it), then score the first pairs of the data.

usage: rm_worker.py <result.json> <override> [<override> ...]
Writes {"tokens": [[ids of each row]], "scores": [reward of each row]} from the last rank.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch
    import torch.distributed as dist

    from megatron_swift.tasks.rm import _scores
    from megatron_swift.training.forward_only import collect
    from megatron_swift.training.loop import export_final_hf
    from tests.multiproc.trained import trained, write_json

    result_file = sys.argv[1]
    cfg, trainer = trained(sys.argv[2:])
    export_final_hf(trainer)
    data = trainer.train_data
    batch = data.collate([data[i] for i in range(4)]).to(trainer.backend.torch_device)
    for chunk in trainer.model:
        chunk.eval()
    scores = collect(trainer.model, [batch], _scores,
                     lambda b, out: out[torch.arange(out.shape[0]), b.lengths - 1, 0], cfg.train.seq_length,
                     batch.tokens.shape[0])
    last = dist.get_world_size() - 1  # the last pipeline stage holds the scores
    rows = [batch.tokens[i, : batch.lengths[i]].tolist() for i in range(batch.tokens.shape[0])]
    write_json(result_file, {"tokens": rows, "scores": scores[0].tolist() if scores else []}, rank=last)


if __name__ == "__main__":
    main()
