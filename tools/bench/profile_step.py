"""Where one training step's device time goes: torch.profiler over the project's own step.

Sets the trainer up as tools/bench/vs_hf.py does (same shapes, data=mock), runs warm-up steps, profiles
a few, and prints the operators by device time (self), then totals by kind (matmul, attention, norm,
elementwise, optimizer, copies, communication) so a slow non-TE path stands out.

    python tools/bench/profile_step.py --shape 8b-width      # one GPU
    python tools/bench/profile_step.py --shape tiny --steps 1   # CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

KINDS = (  # first match wins; patterns over profiler op names (aten ops on CPU, kernels on CUDA)
    ("matmul", r"gemm|matmul|aten::mm|aten::addmm|aten::bmm|cutlass|sm90_xmma|nvjet"),
    ("attention", r"flash|fmha|attention|efficient_attention"),
    ("norm", r"rms_norm|layer_norm|rmsnorm"),
    ("optimizer", r"adam|fused_adamw|multi_tensor|foreach"),
    ("cross-entropy", r"log_softmax|nll_loss|cross_entropy|softmax"),
    ("communication", r"nccl|gloo|all_reduce|allreduce"),
    ("copies/casts", r"copy|cat|to_copy|memcpy|memset|fill|index"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|mul|add|sigmoid|exp|pow|sum|reduce"),
)


def kind_of(name: str) -> str:
    return next((k for k, p in KINDS if re.search(p, name, re.I)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b-width")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from megatron_swift.backend.device import _free_port
    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup
    from tools.bench.vs_hf import _overrides

    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cfg = compose([*_overrides(args.shape, args.overrides), f"train.train_iters={args.steps + args.warmup + 1}",
                   "train.save_at_end=false", "train.save_at_epoch_end=false", "train.max_epochs=null",
                   f"train.output_dir={tempfile.mkdtemp(prefix='profile_step_')}"])
    trainer = setup(cfg)
    trainer.sinks.printer = lambda *_: None
    for _ in range(args.warmup):
        trainer.step()
    trainer.backend.synchronize()
    cuda = trainer.backend.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.step()
        trainer.backend.synchronize()
    events = [e for e in prof.key_averages()]
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    timed = sorted((e for e in events if getattr(e, attr, 0) > 0), key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in timed) or 1
    per_step = total / args.steps / 1e3
    print(f"{trainer.backend.device_name()}: {per_step:.1f} ms of {'device' if cuda else 'CPU'} time per step "
          f"({args.shape}, attention={trainer.backend.attention})")
    for e in timed[:args.top]:
        t = getattr(e, attr)
        print(f"{100 * t / total:6.2f} %  {t / args.steps / 1e3:8.2f} ms/step  x{e.count // args.steps:<5d} "
              f"{e.key[:110]}")
    by_kind = {}
    for e in timed:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0) + getattr(e, attr)
    print("by kind: " + ", ".join(f"{k} {100 * v / total:.1f} % ({v / args.steps / 1e3:.1f} ms)"
                                  for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
    trainer.sinks.close()


if __name__ == "__main__":
    main()
