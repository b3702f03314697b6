"""Core attention kernels for packed rows, side by side: what models.varlen chose and why.

For one packed row (samples of 100 to 1,500 tokens in seq 4096) and the same row unpacked, forward +
backward in bf16 of:

* causal: SDPA ``is_causal`` over the whole row (the unpacked reference: flash kernel, GQA);
* mask: SDPA with the block-diagonal boolean mask (memory-efficient kernel, K/V repeated for GQA);
* varlen: models.varlen (PyTorch's varlen flash kernel over the samples' bounds);
* flex: FlexAttention with a document mask, compiled (compile time printed apart).

Each packed variant's output and input gradients are compared with an fp32 computation of the mask path.

    python tools/bench/attention.py                 # one GPU
    python tools/bench/attention.py --heads 32 --groups 8
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_swift.models import varlen  # noqa: E402
from megatron_swift.models.attention import block_causal_mask  # noqa: E402


def segments_row(seq: int, seed: int = 0) -> torch.Tensor:
    rng, ids, n = random.Random(seed), [], 0
    while len(ids) < seq:
        ids += [n] * rng.randint(100, 1500)
        n += 1
    return torch.tensor([ids[:seq]])


def sdpa_causal(q, k, v, mask):
    out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), is_causal=True, enable_gqa=True)
    return out.permute(2, 0, 1, 3)


def sdpa_mask(q, k, v, mask):
    rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=~mask)
    return out.permute(2, 0, 1, 3)


def varlen_attn(q, k, v, mask):
    out = varlen.attend(q, k, v, mask, q.shape[-1] ** -0.5)
    if out is None:
        raise RuntimeError("models.varlen declined (no varlen kernel in this torch, or not CUDA)")
    return out


def flex_factory(segments):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seg = segments[0]

    def doc_causal(b, h, qi, ki):
        return (seg[qi] == seg[ki]) & (qi >= ki)

    s = seg.numel()
    block = create_block_mask(doc_causal, None, None, s, s, device=seg.device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v, mask):
        out = compiled(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), block_mask=block, enable_gqa=True)
        return out.permute(2, 0, 1, 3)

    return run


def fwd_bwd(fn, q, k, v, mask):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, mask)
    out.float().pow(2).mean().backward()
    return out.detach().float(), [t.grad.float() for t in leaves]


def timed_ms(fn, q, k, v, mask, repeats: int) -> float:
    for _ in range(3):
        fwd_bwd(fn, q, k, v, mask)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fwd_bwd(fn, q, k, v, mask)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    dev = "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = lambda h: (args.seq, 1, h, args.head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h), generator=g).to(dev, torch.bfloat16)
               for h in (args.heads, args.groups, args.groups))
    segments = segments_row(args.seq).to(dev)
    mask = block_causal_mask(segments)
    print(f"seq {args.seq}, heads {args.heads}/{args.groups}, head dim {args.head_dim}, "
          f"{int(segments.max()) + 1} samples in the packed row; torch {torch.__version__}", flush=True)
    ref_out, ref_grads = fwd_bwd(sdpa_mask, q.float(), k.float(), v.float(), mask)
    variants = {"causal (unpacked)": sdpa_causal, "mask": sdpa_mask, "varlen": varlen_attn}
    try:
        start = time.perf_counter()
        flex = flex_factory(segments)
        fwd_bwd(flex, q, k, v, mask)
        print(f"flex compile + first call {time.perf_counter() - start:.1f} s", flush=True)
        variants["flex"] = flex
    except Exception as exc:  # report, carry on with the others
        print(f"flex unavailable: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    base = None
    for name, fn in variants.items():
        try:
            ms = timed_ms(fn, q, k, v, mask, args.repeats)
        except Exception as exc:
            print(f"{name:18s} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        base = base or ms
        line = f"{name:18s} {ms:8.2f} ms fwd+bwd  ({base / ms:.2f}x causal speed)"
        if name != "causal (unpacked)":
            out, grads = fwd_bwd(fn, q, k, v, mask)
            err = max([float((out - ref_out).abs().max())] + [float((a - b).abs().max())
                                                              for a, b in zip(grads, ref_grads)])
            line += f"  max |error| vs fp32 mask path {err:.3g}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
