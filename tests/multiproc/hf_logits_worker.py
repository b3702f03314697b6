"""Run under torchrun: build the model through the trainer's own setup with model.pretrained,
push fixed tokens through megatron-core's forward-only schedule, save full-vocabulary logits (rank 0).

usage: hf_logits_worker.py <tokens.pt> <out.pt> <override> [<override> ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup

    tokens_file, out_file, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = setup(compose(overrides))
    tokens = torch.load(tokens_file, weights_only=True)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)

    def forward_step(_it, model):
        logits = model(tokens, positions, None)

        def loss_func(output, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output)

        return logits, loss_func

    for chunk in trainer.model:
        chunk.eval()
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter([None])] * len(trainer.model)
            if len(trainer.model) > 1 else iter([None]), model=trainer.model, num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
            collect_non_loss_data=True)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(out[0].float(), out_file)
    dist.barrier()


if __name__ == "__main__":
    main()
