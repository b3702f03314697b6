"""MiMo (MiMoForCausalLM, Xiaomi MiMo-7B; remote code, no transformers class): the Qwen2 decoder (GQA, QKV biases,
SwiGLU, RoPE) plus ``num_nextn_predict_layers`` multi-token-prediction layers stored as ``model.mtp_layers.{i}.``.

Each MTP layer is megatron-core's MultiTokenPredictionLayer: RMSNorm of the hidden state (HF hidden_layernorm)
and of the next token's embedding (token_layernorm), concatenated and projected (input_proj, whose column halves
are [hidden; embedding], megatron-core's eh_proj [embedding; hidden]: convert.rules.SwapHalves), one Qwen2
decoder layer, a final RMSNorm, and the model's output head. ``model.mtp_num_layers`` builds fewer (0: none,
said by a printed line); the checkpoint's count is kept in ``family_options`` so that an export from the folder
writes the dropped layers back unchanged with the config that describes them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from megatron_swift.convert.tables import mimo_style
from megatron_swift.models.families.base import Family, Size

_MTP = re.compile(r"model\.mtp_layers\.(\d+)\.")
_NOTED = set()


@dataclass(frozen=True)
class MiMoFamily(Family):
    def read_hf(self, hf: dict, folder: str) -> dict:
        fields = super().read_hf(hf, folder)
        stored = int(hf.get("num_nextn_predict_layers") or 0)
        fields.update(mtp_num_layers=stored, family_options=dict(num_nextn_predict_layers=stored))
        return fields

    def write_hf(self, arch: dict, dtype: str) -> dict:
        config = super().write_hf(arch, dtype)
        stored = (arch.get("family_options") or {}).get("num_nextn_predict_layers", arch.get("mtp_num_layers", 0))
        config.update(num_nextn_predict_layers=max(stored, arch.get("mtp_num_layers", 0)))
        return config

    def rules(self, arch) -> list:
        return mimo_style(mtp_layers=arch.mtp_num_layers, tied=not arch.untie_embeddings, head=arch.head)

    def build(self, arch, tconfig, padded_vocab: int, seq_length: int, backend, unfuse_norms: bool = False) -> list:
        stored = (arch.family_options or {}).get("num_nextn_predict_layers", 0)
        if stored > arch.mtp_num_layers and ("drop", stored) not in _NOTED and os.environ.get("RANK", "0") == "0":
            _NOTED.add(("drop", stored))
            print(f"model: model.mtp_num_layers={arch.mtp_num_layers}: {stored - arch.mtp_num_layers} of the "
                  f"checkpoint's {stored} multi-token-prediction layer(s) (model.mtp_layers.*) are not built or "
                  "trained; an export from this folder writes them back unchanged", flush=True)
        return super().build(arch, tconfig, padded_vocab, seq_length, backend, unfuse_norms)

    def mtp_layers_supported(self, arch) -> int:
        """As many as the checkpoint (or the named size) has: their weights come from it."""
        return (arch.family_options or {}).get("num_nextn_predict_layers", 0)

    def hf_unused(self, arch, name: str) -> bool:
        """MTP layers beyond model.mtp_num_layers (dropped on purpose)."""
        layer = _MTP.match(name)
        return bool(layer and int(layer.group(1)) >= arch.mtp_num_layers)


_M = dict(vocab_size=151680, max_position_embeddings=32768, rotary_base=640000.0, norm_epsilon=1e-5)

FAMILY = MiMoFamily(
    name="mimo",
    hf_architectures=("MiMoForCausalLM",),
    hf_model_type="mimo",
    add_qkv_bias=True,
    weights=mimo_style,
    sizes={
        "tiny": Size(2, 64, 128, 4, 2, max_position_embeddings=1024, mtp_num_layers=1,
                     family_options=dict(num_nextn_predict_layers=1)),
        "mimo-7b": Size(36, 4096, 11008, 32, 8, mtp_num_layers=1, family_options=dict(num_nextn_predict_layers=1),
                        **_M),
    },
)
