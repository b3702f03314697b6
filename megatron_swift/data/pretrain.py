"""Pretraining samples from megatron-core indexed datasets (``.bin``/``.idx``), blended by its own builders.

``data.path`` lists prefixes, ``data.weights`` optional blend weights. The
samples are megatron-core's GPTDataset windows (documents joined with their
end-of-document tokens, cut into ``seq_length + 1`` tokens) and, for several
prefixes, its BlendedDataset, built by BlendedMegatronDatasetBuilder exactly as
Megatron-LM does. Index caches go to ``<output_dir>/data_cache`` (rank 0 builds
them, the other ranks read them).

Sizes: without weights, one epoch is every sample of every prefix once (the
trainer's ``train.max_epochs`` counts these). A weighted blend has no natural
epoch, so it is built with ``train.train_iters x train.global_batch_size``
samples (config validation asks for train_iters).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_swift.data.errors import DataError
from megatron_swift.data.sampler import Batch


@dataclass
class _TokenizerInfo:
    """What megatron-core's GPTDataset reads from a tokenizer. ``pad=-1`` is never a token id, so no real
    token is taken for padding (megatron-core would otherwise warn that pad collides with eod)."""

    eod: int
    vocab_size: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> dict:
        """Part of the key under which megatron-core caches dataset indices."""
        return {"class": "megatron_swift", "eod": self.eod, "vocab_size": self.vocab_size}


class MegatronSamples(torch.utils.data.Dataset):
    """A megatron-core GPTDataset or BlendedDataset behind the trainer's dataset interface."""

    def __init__(self, dataset, description: str):
        self.dataset = dataset
        self.description = description

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]

    @staticmethod
    def collate(items: List[dict]) -> Batch:
        stack = {k: torch.stack([item[k] for item in items]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        return Batch(stack["tokens"], stack["labels"], stack["loss_mask"].float(), stack["position_ids"])


def check_prefixes(prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise DataError(prefix + ext, None, "indexed dataset file not found (data.path takes prefixes "
                                "without .bin/.idx; tools/preprocess_data.py writes them)")


def indexed_source(prefixes: Sequence[str], weights: Optional[Sequence[float]], tokenizer, seq_length: int,
                   seed: int, num_samples: Optional[int], cache_dir: str) -> MegatronSamples:
    """Build (or load from ``cache_dir``) the samples of ``prefixes`` blended by ``weights``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    check_prefixes(prefixes)
    if weights and len(weights) != len(prefixes):
        raise DataError("data.weights", None, f"{len(weights)} weights for {len(prefixes)} data.path entries")
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(list(prefixes), list(weights) if weights else None),
        split="1,0,0", path_to_cache=cache_dir, tokenizer=_TokenizerInfo(tokenizer.eod, tokenizer.vocab_size),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    sizes = [num_samples, 0, 0] if weights else [None, None, None]  # only the train split is drawn
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes,
                                                lambda: True, config).build()
    blend = ", ".join(f"{p} x{w:g}" for p, w in zip(prefixes, weights)) if weights else ", ".join(prefixes)
    return MegatronSamples(train, f"indexed:{blend}")
