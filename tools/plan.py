"""Which layout for this model on these GPUs? Per-rank memory of candidate layouts, ranked by step time.

    python tools/plan.py +model=qwen3 model.size=32b train.seq_length=8192 train.global_batch_size=512 \
        cluster.gpus=64 cluster.gpu=h100-80gb [cluster.gpus_per_node=8] [--top 10]

For each valid (TP, CP, PP, EP, recompute) on cluster.gpus devices (TP within a
node, SP with TP, CP as Ulysses where the heads allow it, else TE's ring: pass
--no-te when the cluster has no Transformer Engine, the distributed optimizer,
micro-batch 1) it prints the
largest rank's weights, gradients, optimizer state (with and without the
distributed optimizer) and activations, the estimated step time, and for the
best layout that fits the command line to run. Formulas:
megatron_swift/plan/memory.py and search.py.
"""
from __future__ import annotations

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gib(n: float) -> str:
    return f"{n / 2**30:7.1f}"


def _arguments(argv):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="python tools/plan.py +model=<family> [key=value ...] [--top N] [--no-te]")
    parser.add_argument("--top", type=int, default=10, help="layouts to print")
    parser.add_argument("--images-per-row", type=int, default=1,
                        help="a VLM with a held tower: images in a row, each counted at data.max_pixels (default 1)")
    parser.add_argument("--no-te", action="store_true", help="the cluster has no Transformer Engine (CP as Ulysses only)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        parser.error(f"unknown option {unknown[0]} (config settings are key=value)")
    return args, overrides


def main(argv) -> None:
    args, argv = _arguments(argv)
    from megatron_swift.config.compose import compose
    from megatron_swift.models.arch import padded_vocab_size, resolve
    from megatron_swift.plan.memory import frozen_model_of, rank_memory, reference_copies, tower_fields
    from megatron_swift.plan.search import GPUS, candidates

    top, te = args.top, not args.no_te
    cfg = compose(argv)
    arch = resolve(cfg.model)
    if arch.vocab_size is None:
        from megatron_swift.data.tokenizer import build_tokenizer

        arch = dataclasses.replace(arch, vocab_size=build_tokenizer(cfg.data.tokenizer or "byte").vocab_size)
    cluster, train = cfg.cluster, cfg.train
    if cluster.gpu not in GPUS:
        raise SystemExit(f"cluster.gpu={cluster.gpu} is not one of: {', '.join(GPUS)}")
    gpus = cluster.gpus or cluster.nodes * cluster.gpus_per_node
    precision = "bf16" if train.precision in ("auto", "bf16") else train.precision
    found = candidates(arch, lambda tp: padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, tp),
                       gpus, cluster.gpus_per_node, cluster.gpu, train.seq_length, train.global_batch_size, precision,
                       te, reference_copies(cfg), frozen_model_of(cfg),
                       dict(train_vision=train.train_vision, **tower_fields(cfg, arch, args.images_per_row)))
    print(f"{arch.family.name}-{cfg.model.size}: seq {train.seq_length}, global batch {train.global_batch_size}, "
          f"{gpus} x {cluster.gpu} ({GPUS[cluster.gpu][0]:.0f} GiB); GiB on the largest rank, distributed optimizer")
    if found and found[0].layout.reference_copies:
        print(f"task={cfg.task.name} holds {found[0].layout.reference_copies} frozen reference copy of the weights "
              "(counted in total; task.precompute_ref=true or LoRA's base needs none)")
    if found and found[0].layout.frozen is not None:
        teacher = found[0].layout.frozen
        where = (f"on its own tensor-parallel size {teacher.tp}: {found[0].memory.frozen / 2**30:.1f} GiB a rank"
                 if teacher.tp else "on each layout below")
        print(f"task={cfg.task.name} holds a frozen {teacher.arch.family.name} model (weights only, counted in total) "
              f"{where}")
    if found and found[0].layout.tower_images:
        t, h, w = found[0].layout.tower_images[0]
        print(f"vision tower held whole on each first-stage rank: {len(found[0].layout.tower_images)} image(s) a row of "
              f"{h} x {w} patches (data.max_pixels; --images-per-row), activations counted")
    print("  tp cp        pp ep  dp recompute   weights  grads  optim  (no dist-opt)  activ   total  fits  step s")
    for c in found[:top]:
        lay, mem = c.layout, c.memory
        plain = rank_memory(arch, padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, lay.tp),
                            dataclasses.replace(lay, distributed_optimizer=False), train.seq_length, precision,
                            mem.stage)
        cp = f"{lay.cp} ({lay.cp_comm})" if lay.cp > 1 else "1"
        print(f"  {lay.tp:>2} {cp:<9} {lay.pp:>2} {lay.ep:>2} {lay.dp:>3} {lay.recompute:<10}{_gib(mem.weights)}"
              f"{_gib(mem.grads)}{_gib(mem.optimizer)}  ({_gib(plain.optimizer)})    {_gib(mem.activations)}"
              f" {_gib(mem.total)}  {'yes' if c.fits else 'no ':<4} {c.step_s:7.2f}")
    best = next((c for c in found if c.fits), None)
    if best is None:
        print("no layout fits: use more GPUs, a shorter train.seq_length, or a smaller model")
        return
    lay = best.layout
    nodes = max(1, gpus // cluster.gpus_per_node)
    extra = " ".join(a for a in argv if not a.startswith(("parallel.", "cluster.", "train.recompute")))
    print("recommended:")
    print(f"  python launch/slurm.py {extra} cluster=slurm cluster.nodes={nodes} "
          f"cluster.gpus_per_node={min(gpus, cluster.gpus_per_node)} parallel.tp={lay.tp} parallel.pp={lay.pp}"
          + (f" parallel.ep={lay.ep} parallel.etp=1" if arch.is_moe else "")
          + (" parallel.sp=true" if lay.sp else "")
          + (f" parallel.cp={lay.cp} parallel.cp_comm={lay.cp_comm}" if lay.cp > 1 else "")
          + " parallel.distributed_optimizer=true"
          + (f" train.recompute={lay.recompute}" if lay.recompute != "none" else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
