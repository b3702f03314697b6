"""Keep the padding rows of the vocabulary out of the softmax.

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by x
TP`` (models.arch.padded_vocab_size), so the number of padding logits depends
on the layout. megatron-core's vocab-parallel cross-entropy normalises over
every column, padding included: weights loaded from HF give those columns
logit 0, which takes probability mass, and a different TP size would then
train a different function. A forward hook on the output layer sets the
padding columns to -inf (probability 0, gradient 0), so the loss is the one
over the real vocabulary under every layout.
"""
from __future__ import annotations

import torch


def mask_padded_logits(output_layer, vocab_size: int, padded_vocab: int) -> None:
    def hook(module, args, output):
        logits, bias = output
        local = logits.shape[-1]
        # Vocabulary-parallel logits hold this rank's block; gathered ones (inference) hold all.
        start = 0 if local == padded_vocab else module.tp_group.rank() * local
        if start + local <= vocab_size:
            return output
        padding = torch.arange(start, start + local, device=logits.device) >= vocab_size
        return logits.masked_fill(padding, float("-inf")), bias

    output_layer.register_forward_hook(hook)
