"""Run under torchrun: per-token losses of every SFT sample, computed in unpacked rows and in packed rows.

usage: sft_loss_worker.py <out.pt> <override> [<override> ...]   (data.source=sft or vl_sft)

Both row sets come from the same encoded samples; each row goes through megatron-core's forward-only
schedule on the trainer's model. Saves {"unpacked": {sample: losses}, "packed": {...}, "rows": n,
"ids": {sample: token ids}}.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def per_token_losses(trainer, batch):
    """[b, s] token losses of one micro-batch (last pipeline stage; None elsewhere)."""
    from megatron.core import parallel_state as ps

    from megatron_swift.models.attention import attention_inputs
    from megatron_swift.training import cp_shard
    from megatron_swift.training.forward_only import collect

    from megatron_swift.models.vlm import image_inputs

    def forward(b, model):
        return model(b.tokens, b.position_ids, labels=b.labels,
                     **attention_inputs(b.segments, trainer.backend.packed_format), **image_inputs(b))

    batch = cp_shard.shard(batch)  # this CP rank's part of the row (the whole row when cp = 1)
    seq = batch.tokens.shape[1] * ps.get_context_parallel_world_size()
    out = collect(trainer.model, [batch], forward, lambda _, loss: loss, seq, batch.tokens.shape[0])
    return cp_shard.unshard(out[0].float()) if ps.is_pipeline_last_stage() else None


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_swift.config.compose import compose
    from megatron_swift.data.sft import SFTRows
    from megatron_swift.data.vl_sft import VLRows
    from megatron_swift.training.loop import setup

    out_file, overrides = sys.argv[1], sys.argv[2:]
    trainer = setup(compose(overrides + ["data.packing=false"]))
    for chunk in trainer.model:
        chunk.eval()
    unpacked = trainer.train_data
    vision = getattr(unpacked, "vision", None)  # data.source=vl_sft: rows with images (data.vl_sft.VLRows)
    packed = (SFTRows(unpacked.samples, unpacked.seq_length, unpacked.pad_id, True, "packed") if vision is None else
              VLRows(unpacked.samples, unpacked.seq_length, unpacked.pad_id, True, "packed", vision))
    result = {"rows": len(packed), "ids": {i: torch.from_numpy(ids) for i, ids in enumerate(unpacked.samples.ids)}}
    for name, rows in (("unpacked", unpacked), ("packed", packed)):
        losses = {}
        for r in range(len(rows)):
            item = rows[r]
            loss = per_token_losses(trainer, rows.collate([item]).to(trainer.backend.torch_device))
            if loss is None:
                continue
            at = 0
            for sample in rows.rows[r]:
                n = len(rows.samples.ids[sample])
                losses[sample] = loss[0, at:at + n - 1].cpu()  # positions with a label inside the sample
                at += n
        result[name] = losses
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0 \
            and ps.get_context_parallel_rank() == 0:
        torch.save(result, out_file)
    dist.barrier()


if __name__ == "__main__":
    main()
