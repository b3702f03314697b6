"""Run under torchrun (2 ranks): Ulysses attention on each rank's part of the sequence against full
attention on the whole sequence, forward and input gradients. usage: ulysses_worker.py <out.json> <groups>"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_swift.backend import cpu_compat
    from megatron_swift.models.attention import block_causal_mask
    from megatron_swift.models.sdpa import SDPAttention
    from megatron_swift.models.ulysses import ulysses_class
    from megatron_swift.training.cp_shard import unshard

    out_file, groups = sys.argv[1], int(sys.argv[2])
    cpu_compat.apply()
    dist.init_process_group("gloo")
    cp = dist.get_world_size()
    ps.initialize_model_parallel(1, 1, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(0)
    heads, s, b, d = 4, 16, 2, 8

    def config(cp_size):
        return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=heads, num_query_groups=groups,
                                 kv_channels=d, context_parallel_size=cp_size, attention_dropout=0.0,
                                 use_cpu_initialization=True)

    g = torch.Generator().manual_seed(0)
    full = {"q": torch.randn(s, b, heads, d, generator=g), "k": torch.randn(s, b, groups, d, generator=g),
            "v": torch.randn(s, b, groups, d, generator=g), "w": torch.randn(s, b, heads * d, generator=g)}
    segments = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16])
    result = {}
    for name, mask in (("causal", None), ("packed", block_causal_mask(segments))):
        # Reference: the whole sequence on one rank.
        ref = SDPAttention(config(1), 1, AttnMaskType.causal, "self")
        leaves = {k: full[k].clone().requires_grad_() for k in "qkv"}
        (ref(leaves["q"], leaves["k"], leaves["v"], mask) * full["w"]).sum().backward()
        # Ulysses: this rank's part ([s, b, ...] cut on dim 0 as the batch's [b, s] on dim 1).
        mine = {k: get_batch_on_this_cp_rank({k: v.transpose(0, 1)})[k].transpose(0, 1) for k, v in full.items()}
        parts = {k: mine[k].clone().requires_grad_() for k in "qkv"}
        module = ulysses_class(SDPAttention)(config(cp), 1, AttnMaskType.causal, "self")
        out = module(parts["q"], parts["k"], parts["v"], mask)
        (out * mine["w"]).sum().backward()
        whole = lambda t: unshard(t.transpose(0, 1).contiguous()).transpose(0, 1)  # noqa: E731
        with torch.no_grad():
            ref_out = ref(full["q"], full["k"], full["v"], mask)
        result[name] = {"out": float((whole(out.detach()) - ref_out).abs().max()),
                        **{f"grad_{k}": float((whole(parts[k].grad) - leaves[k].grad).abs().max()) for k in "qkv"},
                        "grad_scale": float(leaves["q"].grad.abs().max())}
    if dist.get_rank() == 0:
        with open(out_file, "w") as f:
            json.dump(result, f)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
