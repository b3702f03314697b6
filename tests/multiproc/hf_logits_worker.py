"""Run under torchrun: build the model through the trainer's own setup (model.pretrained or model.load),
push fixed tokens through megatron-core's forward-only schedule, save full-vocabulary logits.

usage: hf_logits_worker.py <tokens.pt> <out.pt> <override> [<override> ...]
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "convert"))


def main() -> None:
    import torch
    import torch.distributed as dist
    from check import megatron_logits
    from megatron.core import parallel_state as ps

    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup

    tokens_file, out_file, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = setup(compose(overrides))
    logits = megatron_logits(trainer, torch.load(tokens_file, weights_only=True))
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(logits, out_file)
    dist.barrier()


if __name__ == "__main__":
    main()
