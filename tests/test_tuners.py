"""Which parameters train: LoRA's default, modules_to_save, freeze groups, regexes in order, tied aliases."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_swift.config.validate import ConfigError
from megatron_swift.tuners.freeze import set_trainable, summary


def _params(tied: bool = False):
    names = ["embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
             "decoder.layers.0.self_attention.linear_qkv_lora.a", "decoder.layers.0.mlp.router.weight",
             "decoder.layers.1.mlp.linear_fc1.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    named = [(n, torch.nn.Parameter(torch.zeros(2, 2))) for n in names]
    named[2][1].is_lora = True
    if tied:
        named[0][1].shared_embedding = named[-1][1].shared_embedding = True
    return named


def _cfg(tuner="none", modules_to_save=(), freeze=(), freeze_regex=None, trainable_regex=None):
    return (SimpleNamespace(name=tuner, modules_to_save=list(modules_to_save)),
            SimpleNamespace(freeze=list(freeze), freeze_regex=freeze_regex, trainable_regex=trainable_regex))


def _trainable(named):
    return {n for n, p in named if p.requires_grad}


def test_lora_trains_the_adapters_and_modules_to_save_only():
    named = _params()
    set_trainable(named, *_cfg("lora", modules_to_save=["output_layer"]))
    assert _trainable(named) == {"decoder.layers.0.self_attention.linear_qkv_lora.a", "output_layer.weight"}
    assert "trainable parameters on this rank: 0.000M of 0.000M (28.57 %)" in summary(named)


def test_rules_apply_in_order_and_the_trainable_regex_wins():
    named = _params()
    set_trainable(named, *_cfg(freeze=["embedding"], freeze_regex=r"^decoder\.layers\.0\.",
                               trainable_regex=r".*router.*"))
    frozen = {n for n, _ in named} - _trainable(named)
    assert frozen == {"embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
                      "decoder.layers.0.self_attention.linear_qkv_lora.a"}


def test_a_tied_output_layer_follows_the_embedding():
    named = _params(tied=True)
    set_trainable(named, *_cfg(freeze=["embedding"]))
    assert not named[0][1].requires_grad and not named[-1][1].requires_grad


def test_patterns_matching_nothing_are_all_reported():
    with pytest.raises(ConfigError) as e:
        set_trainable(_params(), *_cfg(freeze=["experts"], trainable_regex="nothing"))
    assert "train.freeze=experts matches no parameter" in str(e.value)
    assert "train.trainable_regex='nothing' matches no parameter; names look like: embedding.word_embeddings" \
        in str(e.value)
