"""What the memory benchmarks share: a random Qwen3-shaped HF checkpoint and their size arguments."""
from __future__ import annotations

import argparse


def make_model(folder: str, hidden: int, layers: int) -> int:
    """Save a random Qwen3-shaped HF model (300-token vocabulary) to ``folder``; returns its parameter count."""
    import torch
    import transformers

    config = transformers.Qwen3Config(vocab_size=300, hidden_size=hidden, intermediate_size=3 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=hidden // 8, tie_word_embeddings=False, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def size_args(doc: str):
    """(--nproc, --hidden, --layers, --steps) and the remaining arguments (overrides for both runs)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    return parser.parse_known_args()
