"""Candidate layouts for a model on a cluster, the ones that fit ranked by an estimated step time.

Step time = model FLOPs of the step / (devices x peak x 0.45), stretched by
the pipeline bubble ``(pp - 1) / (micro-batches x vpp)``, by tensor
parallelism (5 % per extra rank inside a node; TP beyond a node is not
proposed), by expert all-to-all (3 % per extra EP rank) and by recompute
(full: x 4/3, selective: x 1.03), and by context parallelism's exchange per
extra CP rank (``CP_COST``: Ulysses' four all-to-alls per layer and direction
4 %; TE's ring, overlapped with attention, 3 %; hierarchical 3.5 %; all-gather
of K/V 6 %). Context parallelism is proposed only where the sequence needs it
(no layout without it fits) or it is cheaper. It is a ranking device, not a promise:
the factors are typical of Megatron-LM reports, to be calibrated with the
trainer's own MFU figures on the target machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megatron_swift.plan.memory import GIB, Layout, RankMemory, rank_memory
from megatron_swift.training.flops import flops_per_step

# usable memory (GiB) and dense BF16 peak (TFLOP/s) per device
GPUS = {"h100-80gb": (79.6, 989.0), "h200-141gb": (139.8, 989.0), "a100-80gb": (79.2, 312.0),
        "a100-40gb": (39.4, 312.0), "b200-180gb": (178.0, 2250.0)}
HEADROOM_GIB = 4.0  # CUDA context, NCCL buffers, allocator fragmentation
MFU = 0.45
CP_COST = {"a2a": 0.04, "p2p": 0.03, "a2a+p2p": 0.035, "allgather": 0.06}


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: RankMemory
    step_s: float
    fits: bool


def _divisors(n: int, limit: int) -> List[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def step_time(arch, padded_vocab: int, layout: Layout, seq_length: int, global_batch: int, peak_tflops: float) -> float:
    flops = flops_per_step(arch, seq_length, padded_vocab, global_batch)
    if layout.tower_images:  # a held tower: its images' FLOPs, computed again on every TP rank (replicated)
        sizes: dict = {}
        for grid in layout.tower_images:
            tokens = arch.family.tower_image_tokens(arch, grid)
            sizes[tokens] = sizes.get(tokens, 0) + 1
        tower = flops_per_step(arch, seq_length, padded_vocab, global_batch, train_vision=layout.train_vision,
                               image_tokens_per_row=sum(t * n for t, n in sizes.items()), image_sizes=sizes) - flops
        flops += tower * layout.tp
    ideal = flops / (layout.world * peak_tflops * 1e12 * MFU)
    factor = 1 + (layout.pp - 1) / layout.num_microbatches
    factor *= 1 + 0.05 * (layout.tp - 1) + 0.03 * (layout.ep - 1)
    factor *= {"none": 1.0, "selective": 1.03, "full": 4 / 3}[layout.recompute]
    factor *= 1 + CP_COST[layout.cp_comm] * (layout.cp - 1)
    return ideal * factor


def cp_options(arch, tp: int, seq_length: int, limit: int, te: bool):
    """(cp, cp_comm) pairs for a TP size: cp=1, then Ulysses where the heads allow it, TE's ring otherwise."""
    from megatron_swift.models.ulysses import split_problem

    yield 1, "a2a"
    heads, groups = arch.num_attention_heads // tp, arch.num_query_groups // tp
    for cp in (2, 4, 8, 16, 32):
        if cp > limit or seq_length % (2 * cp):
            continue
        if split_problem(heads, groups, cp) is None:
            yield cp, "a2a"
        elif te:
            yield cp, "p2p"


def candidates(arch, padded_vocab_of, gpus: int, gpus_per_node: int, gpu: str, seq_length: int,
               global_batch: int, precision: str = "bf16", te: bool = True,
               reference_copies: int = 0, frozen=None, vision: Optional[dict] = None) -> List[Candidate]:
    """Every valid layout on ``gpus`` devices, best first (fitting ones before the others).

    ``padded_vocab_of(tp)`` is the padded vocabulary under a TP size; ``te``: whether the cluster has
    Transformer Engine (TE's ring CP modes where Ulysses does not divide the heads); ``reference_copies``:
    frozen copies of the model the task holds (plan.memory.reference_copies); ``frozen``: a frozen model of
    another architecture it holds (plan.memory.FrozenModel: GKD's teacher); ``vision``: a VLM's Layout fields
    (train_vision, and a held tower's images: plan.memory.tower_fields)."""
    memory_gib, peak = GPUS[gpu]
    out = []
    for tp in _divisors(gpus_per_node, 8):
        if arch.num_attention_heads % tp or arch.num_query_groups % tp:
            continue
        for cp, cp_comm in cp_options(arch, tp, seq_length, gpus // tp, te):
            for pp in _divisors(arch.num_layers, 64):
                if gpus % (tp * pp * cp):
                    continue
                dp = gpus // (tp * pp * cp)
                if global_batch % dp:
                    continue
                for ep in (_divisors(arch.num_experts, dp * tp) if arch.is_moe else [1]):
                    if arch.is_moe and (dp * tp) % ep:
                        continue
                    for recompute in ("none", "selective", "full"):
                        layout = Layout(tp=tp, pp=pp, ep=ep, etp=1, dp=dp, sp=tp > 1, recompute=recompute,
                                        num_microbatches=global_batch // dp, cp=cp, cp_comm=cp_comm,
                                        reference_copies=reference_copies, frozen=frozen, **(vision or {}))
                        if arch.decoder_family.layout_problems(arch, layout):  # e.g. MLA has no CP yet
                            continue
                        padded = padded_vocab_of(tp)
                        memory = rank_memory(arch, padded, layout, seq_length, precision)
                        fits = memory.total / GIB <= memory_gib - HEADROOM_GIB
                        out.append(Candidate(layout, memory, step_time(arch, padded, layout, seq_length,
                                                                       global_batch, peak), fits))
    return sorted(out, key=lambda c: (not c.fits, c.step_s))
