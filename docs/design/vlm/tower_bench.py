"""Research script behind towers.md (not part of the package or the tests): the Qwen2.5-VL-7B vision tower
(transformers' module, real widths) -- parameters and bytes per rank when held whole, and CPU time of a
forward + backward of `--layers` of its blocks on one image of `--pixels` pixels (scaled to the full depth).

usage: PYTHONPATH=. python docs/design/vlm/tower_bench.py [--layers 2] [--side 448]
"""
import argparse
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--side", type=int, default=448)
    args = ap.parse_args()
    # Qwen2.5-VL-7B-Instruct's vision_config (3B's differs only in out_hidden_size 2048).
    full = transformers.Qwen2_5_VLVisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                               out_hidden_size=3584, window_size=112, patch_size=14,
                                               fullatt_block_indexes=[7, 15, 23, 31])
    with torch.device("meta"):
        tower = transformers.Qwen2_5_VLModel._from_config  # noqa: F841 (the class below is what VLMs hold)
        meta = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel._from_config(full)
    params = sum(p.numel() for p in meta.parameters())
    merger = sum(p.numel() for p in meta.merger.parameters())
    print(f"tower parameters: {params / 1e6:.1f} M (merger {merger / 1e6:.1f} M)")
    # bf16 weights + bf16 grads + fp32 main params + Adam (2 x fp32): 2 + 2 + 4 + 8 bytes per parameter
    print(f"held on each TP rank: weights bf16 {params * 2 / 2**30:.2f} GiB; training state without the distributed "
          f"optimizer {params * 16 / 2**30:.2f} GiB, with it over DP=8 {params * (4 + 12 / 8) / 2**30:.2f} GiB")
    small = transformers.Qwen2_5_VLVisionConfig(**dict(full.to_dict(), depth=args.layers,
                                                       fullatt_block_indexes=[args.layers - 1]))
    torch.manual_seed(0)
    model = transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel._from_config(
        small, attn_implementation="sdpa")
    grid = torch.tensor([[1, args.side // 14, args.side // 14]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14)
    torch.set_num_threads(1)
    for warm in (True, False):
        t = time.perf_counter()
        out = model(pixels, grid_thw=grid).pooler_output
        out.float().square().mean().backward()
        dt = time.perf_counter() - t
    print(f"{int(grid.prod())} patches -> {out.shape[0]} tokens; fwd+bwd of {args.layers} blocks + merger on 1 CPU "
          f"thread: {dt:.2f} s; 32 blocks ~ {dt * 32 / args.layers:.1f} s")


if __name__ == "__main__":
    main()
