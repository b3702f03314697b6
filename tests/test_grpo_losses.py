"""GRPO's arithmetic against values worked out by hand (training/grpo_losses.py, rollout/sampling.py)."""
import math

import pytest
import torch

from megatron_swift.rollout.sampling import SamplingParams, next_tokens
from megatron_swift.training import grpo_losses as g


def test_group_advantages_by_hand():
    # Group 1: rewards 1, 0 -> mean 0.5, unbiased std sqrt(0.5); group 2: 2, 2, ... size 2 each.
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])
    adv = g.advantages(rewards, 2, "group", eps=0.0 + 1e-4)
    s = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0])
    # batch: std of all four = sqrt(((1-1.25)^2 + 1.25^2 + 2*0.75^2) / 3) = sqrt(2.75/3)
    batch = g.advantages(rewards, 2, "batch", eps=1e-4)
    sb = math.sqrt(2.75 / 3)
    assert batch.tolist() == pytest.approx([0.5 / (sb + 1e-4), -0.5 / (sb + 1e-4), 0.0, 0.0])
    assert g.advantages(rewards, 2, "none").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    assert g.zero_spread_groups(rewards, 2).tolist() == [False, True]


def test_token_terms_clipping_and_k3_kl_by_hand():
    logps = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    old = torch.log(torch.tensor([[0.25, 0.3, 0.4]]))  # ratios 2, 1, 0.5
    ref = torch.log(torch.tensor([[0.5, 0.6, 0.1]]))
    for adv, expected_pg in ((1.0, [-1.2, -1.0, -0.5]),   # A>0: min(rA, clip(r)A): 1.2 (clipped), 1, 0.5
                             (-1.0, [2.0, 1.0, 0.8])):    # A<0: -min(-r, -clip(r)): 2, 1, 0.8 (clipped)
        out = g.token_terms(logps, old, ref, torch.tensor([adv]), 0.2, 0.2, beta=0.1)
        # k3: exp(ref - logp) - (ref - logp) - 1 with ref/p = 1, 2, 0.5
        kl = [0.0, 2 - math.log(2) - 1, 0.5 - math.log(0.5) - 1]
        assert out["kl"][0].tolist() == pytest.approx(kl, abs=1e-6)
        assert out["loss"][0].tolist() == pytest.approx([p + 0.1 * k for p, k in zip(expected_pg, kl)], abs=1e-6)
        assert out["ratio"][0].tolist() == pytest.approx([2.0, 1.0, 0.5])
    high = g.token_terms(logps, old, None, torch.tensor([1.0]), 0.2, 0.2, beta=0.0)
    assert high["clipped_high"][0].tolist() == [1.0, 0.0, 0.0] and high["clipped_low"][0].tolist() == [0, 0, 0]
    assert "kl" not in high
    low = g.token_terms(logps, old, None, torch.tensor([-1.0]), 0.2, 0.2, beta=0.0)
    assert low["clipped_low"][0].tolist() == [0.0, 0.0, 1.0]
    # clip-higher: epsilon_high 1.5 keeps the ratio-2 token unclipped for A > 0
    wide = g.token_terms(logps, old, None, torch.tensor([1.0]), 0.2, 1.5, beta=0.0)
    assert wide["loss"][0].tolist() == pytest.approx([-2.0, -1.0, -0.5])


def test_loss_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # grpo: (1+2+3)/3 + 4/1 = 6 over 2 completions
    total, count = g.aggregate(loss, mask, "grpo", 8)
    assert (total.item(), count.item()) == (6.0, 2.0)
    # bnpo: (1+2+3+4)/4 tokens = 2.5 for this micro-batch, count 1
    total, count = g.aggregate(loss, mask, "bnpo", 8)
    assert (total.item(), count.item()) == (2.5, 1.0)
    # dr_grpo: 10 / max_completion_length 8 = 1.25, over 2 completions
    total, count = g.aggregate(loss, mask, "dr_grpo", 8)
    assert (total.item(), count.item()) == (1.25, 2.0)
    # dapo: token sum 10 over 4 tokens (the schedule adds every micro-batch's count)
    total, count = g.aggregate(loss, mask, "dapo", 8)
    assert (total.item(), count.item()) == (10.0, 4.0)
    with pytest.raises(ValueError):
        g.aggregate(loss, mask, "nope", 8)


def test_sampling_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert next_tokens(logits, SamplingParams(temperature=0), None).tolist() == [0]
    gen = torch.Generator().manual_seed(0)
    # top_k=1 and top_p=0.4 both leave only token 0; top_p=0.7 leaves tokens 0 and 1 (0.5 < 0.7 <= 0.8).
    for params, allowed in ((SamplingParams(top_k=1), {0}), (SamplingParams(top_p=0.4), {0}),
                            (SamplingParams(top_p=0.7), {0, 1}), (SamplingParams(top_k=3), {0, 1, 2})):
        drawn = {next_tokens(logits, params, gen).item() for _ in range(200)}
        assert drawn == allowed, (params, drawn)


def test_positions_outside_the_completion_cannot_overflow():
    # A prompt token where the reference is 200 nats above the policy: exp(200) is inf in fp32.
    logps = torch.tensor([[-200.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.5]])
    out = g.token_terms(logps, logps.detach(), ref, torch.tensor([1.0]), 0.2, 0.2, beta=0.1,
                        mask=torch.tensor([[0.0, 1.0]]))
    total, _ = g.aggregate(out["loss"], torch.tensor([[0.0, 1.0]]), "grpo", 4)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logps.grad).all()
    # The completion token keeps its value: -1 (A=1, ratio 1) + 0.1 * (e^-0.5 + 0.5 - 1)
    assert total.item() == pytest.approx(-1 + 0.1 * (math.exp(-0.5) + 0.5 - 1), abs=1e-6)
