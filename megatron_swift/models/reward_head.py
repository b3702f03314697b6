"""A reward model's output layer: one scalar per position from the final hidden state.

It takes the place of GPTModel's vocabulary-parallel ``output_layer`` and
keeps its call signature. One output cannot be split across tensor-parallel
ranks, so the weight ([1, hidden], the layout of transformers' ``score``) is
replicated: every TP rank sees the whole sequence (gathered first under
sequence parallelism, whose backward reduce-scatters the input gradient), so
each computes the same weight gradient and no extra all-reduce is needed.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule


class RewardHead(MegatronModule):
    def __init__(self, config):
        super().__init__(config)
        self.sequence_parallel = config.sequence_parallel
        # normal(0, init_method_std) as transformers initialises ``score``, always (the causal-LM checkpoints a
        # reward model starts from have no such weight). A generator seeded with the stage's seed gives every
        # rank the same draw whatever the other layers drew before: the copies of a replicated weight agree.
        generator = torch.Generator().manual_seed(torch.initial_seed())
        weight = torch.empty(1, config.hidden_size).normal_(0.0, config.init_method_std, generator=generator)
        self.weight = torch.nn.Parameter(weight.to(config.params_dtype))

    def forward(self, hidden_states: torch.Tensor, weight=None, runtime_gather_output=None):
        """[s, b, h] -> ([s, b, 1], None), the (output, bias) pair GPTModel expects."""
        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states)
        return torch.nn.functional.linear(hidden_states, self.weight), None
