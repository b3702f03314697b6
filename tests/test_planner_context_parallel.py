"""The layout planner with context parallelism: activation memory per rank, the DP x CP optimizer shard,
the exchange's cost, and CP proposed where a long sequence needs it."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_swift.config.compose import compose
from megatron_swift.models.arch import padded_vocab_size, resolve
from megatron_swift.plan.memory import Layout, activation_bytes, rank_memory
from megatron_swift.plan.search import CP_COST, candidates, step_time


@pytest.fixture(scope="module")
def arch():
    a = resolve(compose(["+model=qwen3", "model.size=8b"]).model)
    return dataclasses.replace(a, vocab_size=a.vocab_size or 151936)


def test_a_cp_rank_holds_its_share_of_the_activations(arch):
    s, h, t = 32768, arch.hidden_size, 2
    one = Layout(tp=t, sp=True, dp=2, num_microbatches=4)
    two = dataclasses.replace(one, dp=1, cp=2)
    # Korthikanti et al. with SP, no stored scores (flash/SDPA): 34·s·b·h/t per layer, fp32 logits 4·s·b·V/t.
    by_hand = lambda seq: 34 * seq * h / t * arch.num_layers + 4 * seq * 151936 / t  # noqa: E731
    assert activation_bytes(arch, 151936, one, s, 0) == int(by_hand(s))
    assert activation_bytes(arch, 151936, two, s, 0) == int(by_hand(s // 2))
    # the distributed optimizer's dense state is sharded over DP x CP: same shard at dp=2 and at dp=1 x cp=2
    assert rank_memory(arch, 151936, one, s).optimizer == rank_memory(arch, 151936, two, s).optimizer


def test_context_parallel_costs_its_exchange(arch):
    base = Layout(tp=1, dp=4, num_microbatches=8)
    cp4 = dataclasses.replace(base, dp=1, cp=4)
    ratio = step_time(arch, 151936, cp4, 8192, 32, 989.0) / step_time(arch, 151936, base, 8192, 32, 989.0)
    assert ratio == pytest.approx(1 + 3 * CP_COST["a2a"])


def test_a_long_sequence_gets_context_parallelism_and_ring_only_with_te(arch):
    vocab = lambda tp: padded_vocab_size(151936, 128, tp)  # noqa: E731
    found = candidates(arch, vocab, 16, 8, "h100-80gb", 131072, 64)
    best = next(c for c in found if c.fits)
    assert best.layout.cp > 1 and best.layout.cp_comm == "a2a"
    no_cp = min(c.step_s for c in found if c.fits and c.layout.cp == 1)  # e.g. TP=8 x PP=2, full recompute
    assert best.step_s < no_cp
    comms = {(c.layout.tp, c.layout.cp): c.layout.cp_comm for c in candidates(arch, vocab, 64, 8, "h100-80gb",
                                                                              131072, 64, te=False)}
    assert set(comms.values()) == {"a2a"}  # without TE only Ulysses is proposed
    assert (8, 8) not in comms  # 32/8 = 4 heads per TP rank cannot split 8 ways
    with_te = {(c.layout.tp, c.layout.cp): c.layout.cp_comm for c in candidates(arch, vocab, 64, 8, "h100-80gb",
                                                                                131072, 64, te=True)}
    assert with_te[(8, 8)] == "p2p"
