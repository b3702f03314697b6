"""Sampling draws from softmax(logits / temperature), the temperature applied once, filtered by top-k/top-p."""
from __future__ import annotations

import pytest
import torch

from megatron_swift.rollout.sampling import SamplingParams, next_tokens


def reference(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """The same generator state drawing from the textbook distribution."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial((logits / temperature).softmax(-1), 1, generator=g).squeeze(-1)


@pytest.mark.parametrize("temperature", [0.5, 0.7, 2.0])
def test_tokens_are_drawn_from_the_logits_divided_once_by_the_temperature(temperature):
    logits = torch.randn(2048, 12, generator=torch.Generator().manual_seed(1)) * 3
    drawn = next_tokens(logits, SamplingParams(temperature=temperature), torch.Generator().manual_seed(7))
    assert torch.equal(drawn, reference(logits, temperature, 7))
    # Frequencies follow softmax(logits / T) (a second division would move them far off).
    probs = (logits[:1].expand(20000, -1) / temperature).softmax(-1)[0]
    many = next_tokens(logits[:1].expand(20000, -1), SamplingParams(temperature=temperature),
                       torch.Generator().manual_seed(3))
    assert (torch.bincount(many, minlength=12) / 20000.0 - probs).abs().max() < 0.02


def test_top_k_keeps_the_k_most_likely_tokens_at_any_temperature():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(4000, -1)
    drawn = next_tokens(logits, SamplingParams(temperature=2.0, top_k=2), torch.Generator().manual_seed(0))
    share = (drawn == 0).float().mean().item()
    assert set(drawn.tolist()) == {0, 1} and abs(share - torch.tensor([2.0, 1.5]).softmax(-1)[0].item()) < 0.03
