"""The judge reward's model: a frozen HF checkpoint (any supported family) built on megatron-core under the
run's TP/PP layout, answering greedily through the megatron rollout engine with its own tokenizer and chat
template. Every rank of a model-parallel group runs it together (rollout.source scores judge rewards on all
of them); the policy's weights are not involved.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List

import torch


def build_judge_generate(cfg, backend) -> Callable[[List[str]], List[str]]:
    """``generate(texts) -> replies`` for task.judge.model: each text is sent as one user turn."""
    from megatron_swift.data.prompts import stop_token_ids
    from megatron_swift.data.templates import load_template
    from megatron_swift.data.tokenizer import build_tokenizer
    from megatron_swift.models.arch import padded_vocab_size
    from megatron_swift.models.frozen import arch_from_folder, build_frozen
    from megatron_swift.rewards.judge import truncated_reply
    from megatron_swift.rollout.megatron_engine import MegatronEngine
    from megatron_swift.rollout.sampling import SamplingParams

    from megatron_swift.config.errors import ConfigError
    from megatron_swift.data.errors import DataError

    judge = cfg.task.judge
    folder = judge.model
    try:  # the judge's own tokenizer and chat template (their messages speak of data.tokenizer: say which)
        tokenizer = build_tokenizer(folder)
        template = load_template(None, folder)
    except (DataError, ValueError, OSError) as e:
        raise ConfigError([f"task.judge.model={folder}: the judge's tokenizer or chat template: {e}"]) from None
    arch = arch_from_folder(folder)
    arch = dataclasses.replace(arch, vocab_size=arch.vocab_size or tokenizer.vocab_size)
    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp)
    chunks = build_frozen(cfg, backend, arch, folder, padded, arch.max_position_embeddings or cfg.train.seq_length)
    engine = MegatronEngine(chunks, backend.torch_device, arch.vocab_size, masks=backend.attention != "te")
    stops = stop_token_ids(template, tokenizer)
    params = SamplingParams(max_new_tokens=judge.max_new_tokens, temperature=0, stop_token_ids=stops)

    def generate(texts: List[str]) -> List[str]:
        prompts = [tokenizer.encode_with_offsets(
            template.render([{"role": "user", "content": t}], add_generation_prompt=True))[0] for t in texts]
        with torch.no_grad():
            out = engine.generate(prompts, params)
        replies = [tokenizer.decode([t for t in ids if t not in stops]) for ids in out.token_ids]
        # a reply cut at task.judge.max_new_tokens may end in the middle of its score: never a score
        return [r if done else truncated_reply(r) for r, done in zip(replies, out.stopped)]

    return generate
