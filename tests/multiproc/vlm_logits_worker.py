"""Run under torchrun: build a VLM through the trainer's own setup (model.pretrained or model.load), push
fixed tokens and images through megatron-core's forward-only schedule, save full-vocabulary logits.

usage: vlm_logits_worker.py <inputs.pt: tokens, images, image_index> <out.pt> <override> [<override> ...]

A held tower's inputs come as "media.<name>" entries of inputs.pt (models/held_tower.py), M-RoPE's [3, b, s]
positions as "position_ids" (default: 0..s-1).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_swift.config.compose import compose
    from megatron_swift.training.forward_only import collect, eval_mode
    from megatron_swift.training.loop import setup

    inputs_file, out_file, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = setup(compose(overrides))
    device = trainer.backend.torch_device
    inputs = {k: v.to(device) for k, v in torch.load(inputs_file, weights_only=True).items()}
    tokens = inputs["tokens"]
    positions = inputs.get("position_ids", torch.arange(tokens.shape[1], device=device).expand_as(tokens))
    media = {k[len("media."):]: v for k, v in inputs.items() if k.startswith("media.")} or None

    def forward(batch, chunk):
        return chunk(batch["tokens"], positions, None, images=batch.get("images"), image_index=batch["image_index"],
                     media=media)

    with eval_mode(trainer.model):
        out = collect(trainer.model, [inputs], forward, lambda _, logits: gather_from_tensor_model_parallel_region(
            logits), tokens.shape[1], tokens.shape[0])
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(out[0].float().cpu(), out_file)
    dist.barrier()


if __name__ == "__main__":
    main()
