"""Run under torchrun: the trainer's own model (model.pretrained, any layout) generates greedily from fixed
prompts with the megatron rollout engine; rank 0 writes the completions as JSON.

usage: rollout_worker.py <prompts.json> <out> <max_new_tokens> <stop id> <batching>[,<batching>...] <override> [...]

One model set-up serves each batching in turn (a launch costs more than a generation); rank 0 writes
<out>.<batching>.json. batching: padded | unpadded (every rank generates every prompt), split (2 ranks: rank 0 the first prompt,
rank 1 the others, padded), which makes the ranks finish at different steps; each rank writes <out>.split.<rank>.json;
or wide: the prompts five times over in one batch (padded), so that a decode step multiplies 20 rows (the
skinny products of backend.no_grad_paths on CPU), prefilled 3 rows per forward (the last group has 2).
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch.distributed as dist

    from megatron_swift.config.compose import compose
    from megatron_swift.rollout.megatron_engine import MegatronEngine
    from megatron_swift.rollout.sampling import SamplingParams
    from megatron_swift.training.loop import setup

    prompts_file, out_file, max_new, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    modes, overrides = sys.argv[5].split(","), sys.argv[6:]
    trainer = setup(compose(overrides))
    for mode in modes:
        prompts = json.loads(open(prompts_file).read())
        if mode == "split":
            prompts = prompts[:1] if dist.get_rank() == 0 else prompts[1:]
        elif mode == "wide":
            prompts = prompts * 5
        width = max(map(len, prompts))
        engine = MegatronEngine(trainer.model, trainer.backend.torch_device, trainer.arch.vocab_size,
                                masks=mode != "unpadded", prefill_tokens=3 * width if mode == "wide" else 1024)
        out = engine.generate(prompts, SamplingParams(max_new_tokens=max_new, temperature=0, stop_token_ids=[stop]))
        if dist.get_rank() == 0 or mode == "split":
            with open(f"{out_file}.{mode}" + (f".{dist.get_rank()}" if mode == "split" else "") + ".json", "w") as f:
                json.dump({"token_ids": out.token_ids, "stopped": out.stopped}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
