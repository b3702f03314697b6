"""Run under torchrun: the trainer's own model (model.pretrained, any layout) generates greedily from fixed
prompts with the megatron rollout engine; rank 0 writes the completions as JSON.

usage: rollout_worker.py <prompts.json> <out.json> <max_new_tokens> <stop id> <override> [<override> ...]
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

    prompts_file, out_file, max_new, stop, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        sys.argv[5:]
    trainer = setup(compose(overrides))
    prompts = json.loads(open(prompts_file).read())
    engine = MegatronEngine(trainer.model, trainer.backend.torch_device, trainer.arch.vocab_size)
    out = engine.generate(prompts, SamplingParams(max_new_tokens=max_new, temperature=0, stop_token_ids=[stop]))
    if dist.get_rank() == 0:
        with open(out_file, "w") as f:
            json.dump({"token_ids": out.token_ids, "stopped": out.stopped}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
