"""Generation with the policy itself, under its training layout (TP, PP, EP, DP): no second copy of the weights.

The model chunks are the trainer's own (DDP-wrapped) megatron-core modules; a ``StaticInferenceContext``
(megatron-core's KV cache for a fixed batch) makes each new token one forward of one position. Pipeline
stages exchange activations through megatron-core's forward-only schedule (training.forward_only), the
last stage gathers the vocabulary-parallel logits and draws the token, and the pipeline group receives it
by broadcast, so every rank feeds the same tokens on.

Prompts of different lengths share a batch by left padding: the cache is filled with every prompt at once
(one forward, or several over groups of rows when the padded prompts exceed ``prefill_tokens``), then one
position per new token. Padding is never attended (an attention mask, only when some
prompt is shorter); rotary embeddings depend on relative positions only, so a padded prompt computes what it
would alone, up to rounding; greedy output equals ``transformers``' per-prompt greedy generation in the tests.
Under Transformer Engine's attention, which takes a mask type rather than megatron-core's mask in this
path, prompts are not padded: the cache is filled with the shortest prompt's length, then a sample still
in its prompt is fed its own token (megatron-core's static engine does the same). Every rank runs the same
number of forwards (they are collective across data-parallel ranks under expert parallelism).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.utils import get_attr_wrapped_model

from megatron_swift.backend import no_grad_paths
from megatron_swift.backend.device import collective_device
from megatron_swift.rollout.rotated_cache import rotated_cache
from megatron_swift.rollout.sampling import SamplingParams, next_tokens
from megatron_swift.training.forward_only import collect, eval_mode


@dataclass
class Completions:
    """What one ``generate`` call returns, one entry per prompt (every rank of the model-parallel group
    holds the same values)."""

    token_ids: List[List[int]]  # generated tokens, the stop token included when one ended the completion
    stopped: List[bool]  # ended by a stop token (False: cut at max_new_tokens)


class MegatronEngine:
    """``generate(prompts, params, generator)`` on the policy's model chunks."""

    name = "megatron"

    def __init__(self, model: List[torch.nn.Module], device, vocab_size: int, batch_size: int = 0,
                 masks: bool = True, prefill_tokens: int = 1024):
        self.model = model
        self.device = device
        self.vocab_size = vocab_size  # the real vocabulary: padding columns never come out
        self.batch_size = batch_size  # prompts per generation (0: all at once); bounds the KV cache's memory
        # Padded prompt tokens per prefill forward (0: the whole batch in one): bounds the prefill's activation
        # memory, and on CPU smaller matrices are faster (a 4032-token prefill of the bench model: 4 forwards of
        # 1008 tokens take 15 % less time than one). Rows are split, never a prompt.
        self.prefill_tokens = prefill_tokens
        # Whether the core attention honours an attention mask in megatron-core's inference path (sdpa and
        # local do; TE's kernels take the mask type instead, causal then no_mask): else no padding is used.
        self.masks = masks

    def generate(self, prompts: List[List[int]], params: SamplingParams,
                 generator: Optional[torch.Generator] = None) -> Completions:
        step = self.batch_size or len(prompts)
        out = Completions([], [])
        # Eval mode: no dropout, and megatron-core's inference path (KV cache) only runs in it.
        with eval_mode(self.model), torch.no_grad(), no_grad_paths.generation(), \
                rotated_cache(get_attr_wrapped_model(self.model[0], "config")):
            for start in range(0, len(prompts), step):
                part = self._generate(prompts[start:start + step], params, generator)
                out.token_ids += part.token_ids
                out.stopped += part.stopped
        return out

    def _generate(self, prompts: List[List[int]], params: SamplingParams, generator) -> Completions:
        b = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        width = int(lengths.max())
        # Where each prompt sits: left-padded to end at `width` (one prefill), or from 0 without padding.
        offsets = width - lengths if self.masks else torch.zeros_like(lengths)
        begin = offsets + lengths  # each completion's first position
        end = begin + params.max_new_tokens  # one past its last
        total = int(end.max())
        tokens = torch.zeros(b, total, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens[i, int(offsets[i]):int(begin[i])] = torch.tensor(prompt, dtype=torch.long)
        padding = torch.arange(total).unsqueeze(0) < offsets.unsqueeze(1)
        padded = bool(padding.any())
        finished = torch.zeros(b, dtype=torch.bool)
        stopped = torch.zeros(b, dtype=torch.bool)
        stop_at = end.clone()
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long)
        context = StaticInferenceContext(b, total)
        done, pos = 0, int(begin.min())  # tokens in the cache; the position the next token goes to
        while pos < total and not _everyone_finished(finished):
            mask = _attention_mask(padding[:, :pos], done) if padded else None
            drawn = self._next(tokens[:, done:pos], done, context, params, generator, mask)
            context.sequence_len_offset = pos
            done = pos
            # A sample still in its prompt is fed its own next token instead of the drawn one.
            generating = (pos >= begin) & ~finished
            tokens[:, pos] = torch.where(generating, drawn, tokens[:, pos])
            hit = generating & torch.isin(drawn, stop_ids)
            stopped |= hit
            stop_at = torch.where(hit, pos + 1, stop_at)
            finished |= hit | (generating & (pos + 1 >= end))
            pos += 1
        return Completions([tokens[i, int(begin[i]):int(stop_at[i])].tolist() for i in range(b)],
                           [bool(s) for s in stopped])

    def _next(self, chunk_tokens: torch.Tensor, offset: int, context, params, generator, mask) -> torch.Tensor:
        """Feed ``chunk_tokens`` [b, n] at positions offset..offset+n-1; the token drawn after them, [b]."""
        logits = [self._last_logits(chunk_tokens[rows], offset, context, None if mask is None else mask[rows],
                                    rows.start) for rows in self._row_groups(*chunk_tokens.shape)]
        drawn = torch.zeros(chunk_tokens.shape[0], dtype=torch.long, device=self.device)
        if ps.is_pipeline_last_stage():
            # One draw for the whole batch: the random stream does not depend on how the prefill was split.
            drawn = next_tokens(torch.cat(logits), params, generator)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(drawn, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return drawn.cpu()

    def _row_groups(self, b: int, n: int) -> List[slice]:
        """The rows fed per forward: all of them for a decode step; for a prefill, groups of at most
        ``prefill_tokens`` padded tokens. Under expert parallelism every data-parallel rank must make the same
        forwards, and their prompts differ: there the prefill is not split."""
        rows = b
        if n > 1 and self.prefill_tokens and ps.get_expert_model_parallel_world_size() == 1:
            rows = max(1, self.prefill_tokens // n)
        return [slice(start, min(start + rows, b)) for start in range(0, b, rows)]

    def _last_logits(self, tokens: torch.Tensor, offset: int, context, mask, row: int) -> Optional[torch.Tensor]:
        """The real-vocabulary logits [rows, V] after the last position of ``tokens`` (rows row.. of the batch,
        whose KV cache rows they fill); None off the last pipeline stage."""
        tokens = tokens.to(self.device)
        positions = torch.arange(offset, offset + tokens.shape[1], device=self.device).expand_as(tokens)
        mask = None if mask is None else mask.to(self.device)
        # megatron-core's inference path gathers the vocabulary-parallel logits itself (runtime_gather_output).
        def forward(t, chunk):
            return chunk(t, positions, mask, inference_context=context, runtime_gather_output=True)

        context.batch_size_offset = row  # where in the KV cache these rows' keys and values go
        try:
            if len(self.model) == 1 and ps.get_pipeline_model_parallel_world_size() == 1:
                out = [forward(tokens, self.model[0])]  # one stage: no schedule to go through
            else:
                out = collect(self.model, [tokens], forward, lambda _, logits: logits, tokens.shape[1],
                              tokens.shape[0])
        finally:
            context.batch_size_offset = 0
        return out[0][:, -1, :self.vocab_size] if ps.is_pipeline_last_stage() else None


def _everyone_finished(finished: torch.Tensor) -> bool:
    """Whether every rank's completions have ended. Expert-parallel layers exchange tokens across data-parallel
    ranks, which hold other prompts: there all ranks stop at the same step. (Tensor and pipeline ranks hold
    the same prompts and tokens, so they agree already.)"""
    if ps.get_expert_model_parallel_world_size() == 1:
        return bool(finished.all())
    flag = torch.tensor(float(bool(finished.all())), device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _attention_mask(padding: torch.Tensor, start: int) -> torch.Tensor:
    """megatron-core's mask (True: not attended) [b, 1, queries start..k-1, keys 0..k-1]: causal, and no key
    that is left padding. A padding query keeps its own key, so that no softmax row is empty (its output is
    never used: padding is never a key)."""
    keys = padding.shape[1]
    q = torch.arange(start, keys).unsqueeze(1)
    k = torch.arange(keys).unsqueeze(0)
    masked = (k > q).unsqueeze(0) | padding.unsqueeze(1)
    masked &= ~(k == q).unsqueeze(0)
    return masked.unsqueeze(1)
