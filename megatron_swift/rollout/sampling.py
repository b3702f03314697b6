"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Kept apart from any engine so that the megatron engine and tests share one definition. Sampling draws
from an explicit ``torch.Generator`` on the logits' device: every rank that must agree on a token (the
tensor-parallel ranks of the last pipeline stage) holds the same generator state and the same logits, so
they draw the same token without exchanging it, and a resumed run draws what the uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch


@dataclass
class SamplingParams:
    """How completions are drawn."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    stop_token_ids: List[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (the top token always)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # A token is dropped when the tokens ranked before it already reach p.
    drop_sorted = (probs.cumsum(-1) - probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> torch.Tensor:
    """[b, V] float logits -> [b] token ids."""
    logits = logits.float()
    if params.greedy:
        return logits.argmax(-1)
    logits = _filter_top_p(_filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    # The generator must live on the logits' device (rollout.source makes it there): no copy to the host.
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
