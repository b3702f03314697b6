"""Run under torchrun: several runs' setups in one launch (CI time), each model's tensors gathered to HF names.

usage: new_tokens_worker.py <out dir> <runs.json>
runs.json: [{"name": ..., "overrides": [...], "fit": bool, "tokens": <tokens.pt>}, ...]

For each run the trainer's own setup() builds and loads the model under the run's layout (and with "fit" trains
it as launch/train.py would; with "tokens" its logits for them go to ``<out>/<name>-logits.pt``); every parameter is
gathered over TP and split into its HF tensors by the family's table; the pipeline stage writes
``<out>/<name>-pp<stage>.pt`` ({HF name: tensor}; a tied output layer's copy on the last stage as
``copy:<HF name>``). The parallel groups are then torn down for the next run.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def gathered(trainer):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_swift.convert.hf_load import match_rule, param_sources

    chunks = [m.module for m in trainer.model]
    out = {}
    padded = trainer.model_meta["padded_vocab_size"]
    for name, param, rules, offsets, ctx, _ in param_sources(chunks, trainer.arch, padded):
        full = param.detach()
        if getattr(param, "tensor_model_parallel", False) and ctx.tp > 1:
            parts = [torch.empty_like(full) for _ in range(ctx.tp)]
            dist.all_gather(parts, full.contiguous(), group=ps.get_tensor_model_parallel_group())
            full = torch.cat(parts, dim=param.partition_dim)
        if getattr(param, "is_lora", False):
            continue  # adapters have no HF tensor of their own
        rule, layer = match_rule(name, rules, offsets, "test")
        copy = "copy:" if getattr(param, "shared_embedding", False) and name.endswith("output_layer.weight") else ""
        for hf_name, tensor in rule.split(full, layer, ctx).items():
            out[copy + hf_name] = tensor.clone()
    return out


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup

    out_dir, runs = sys.argv[1], json.load(open(sys.argv[2]))
    for run in runs:
        trainer = setup(compose(run["overrides"]))
        if run.get("fit"):
            trainer.fit()
        if run.get("tokens"):
            from types import SimpleNamespace

            sys.path.insert(0, os.path.join(ROOT, "tools", "convert"))
            from check import megatron_logits

            logits = megatron_logits(SimpleNamespace(model=trainer.model, backend=trainer.backend),
                                     torch.load(run["tokens"], weights_only=True))
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                torch.save(logits, os.path.join(out_dir, f"{run['name']}-logits.pt"))
        tensors = gathered(trainer)
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save(tensors, os.path.join(out_dir, f"{run['name']}-pp{ps.get_pipeline_model_parallel_rank()}.pt"))
        trainer.sinks.close()
        dist.barrier()
        ps.destroy_model_parallel()


if __name__ == "__main__":
    main()
