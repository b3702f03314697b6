"""GLM-4.5 / GLM-4.6 (Glm4MoeForCausalLM): GQA with QKV biases (attention_bias), optional per-head QK norm
(use_qk_norm) and partial rotary; the first first_k_dense_replace layers dense, the others routed SwiGLU
experts chosen by sigmoid scores plus a correction bias (e_score_correction_bias), weights renormalised and
scaled by routed_scaling_factor, plus shared experts.

Multi-token prediction: checkpoints store num_nextn_predict_layers MTP layers as model.layers.{N + i} (a decoder
layer plus enorm, hnorm, eh_proj, shared_head.norm, and copies of the embedding and output head). They are built
as megatron-core's MTP layers (convert.tables.NEXTN_MTP); model.mtp_num_layers builds fewer (a printed line),
and an export with the source folder writes the dropped layers and the copies back unchanged (hf_unused)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial

from megatron_swift.convert import hf_config as hc
from megatron_swift.convert.tables import NEXTN_MTP, moe_style, mtp_part
from megatron_swift.models.families.base import Family, Size

_REPORTED = set()


def _note_dropped(arch) -> None:
    """One printed line (first rank, once) when model.mtp_num_layers leaves some of the checkpoint's MTP layers out."""
    stored = _stored_mtp(arch)
    if stored > arch.mtp_num_layers and stored not in _REPORTED and int(os.environ.get("RANK", "0")) == 0:
        _REPORTED.add(stored)
        print(f"model: model.mtp_num_layers={arch.mtp_num_layers}: {stored - arch.mtp_num_layers} of the checkpoint's "
              f"{stored} multi-token-prediction layer(s) (model.layers.{arch.num_layers + arch.mtp_num_layers}..) are "
              "not built or trained; an export with the source folder writes them back unchanged", flush=True)


def _stored_mtp(arch) -> int:
    options = arch.family_options if not isinstance(arch, dict) else arch.get("family_options")
    return (options or {}).get("num_nextn_predict_layers", 0)


def _read(hf: dict, where: str) -> dict:
    topk, groups = hf.get("num_experts_per_tok", 0), hf.get("n_group") or 1
    hc.check_keys(hf, where, {
        # megatron-core 0.16 renormalises sigmoid top-k weights whenever top-k > 1, and never for top-1.
        "norm_topk_prob": (bool, "sigmoid routing weights are always renormalised here: only true"),
        "num_experts_per_tok": (lambda v: v > 1, "top-1 sigmoid routing is not renormalised by megatron-core"),
        # megatron-core scores a group by its top (topk / topk_group) experts, transformers by its top 2.
        "topk_group": (lambda v: groups == 1 or topk // v == 2, "with n_group > 1, num_experts_per_tok / "
                       "topk_group must be 2 (groups are scored by their top two experts)"),
    })
    stored = hc.stored_nextn_layers(hf, os.path.dirname(where))
    fields = hc.routed_fields(hf, "n_routed_experts", "moe_intermediate_size", norm_topk_default=True)
    shared = hf.get("n_shared_experts") or 0
    fields.update(moe_shared_ffn_hidden_size=shared * hf["moe_intermediate_size"] or None,
                  moe_score_function="sigmoid", moe_expert_bias=True,
                  moe_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                  moe_num_groups=groups if groups > 1 else None,
                  moe_group_topk=hf.get("topk_group") if groups > 1 else None,
                  moe_dense_first=hf.get("first_k_dense_replace", 0),
                  qkv_bias=bool(hf.get("attention_bias", False)), qk_norm=bool(hf.get("use_qk_norm", False)),
                  mtp_num_layers=stored, family_options=dict(num_nextn_predict_layers=stored) if stored else None)
    return fields


def _write(arch: dict) -> dict:
    width = arch["moe_ffn_hidden_size"]
    keys = hc.routed_keys(arch, "n_routed_experts", "moe_intermediate_size")
    return dict(keys, norm_topk_prob=True, n_shared_experts=(arch.get("moe_shared_ffn_hidden_size") or 0) // width,
                routed_scaling_factor=arch.get("moe_topk_scaling_factor") or 1.0,
                n_group=arch.get("moe_num_groups") or 1, topk_group=arch.get("moe_group_topk") or 1,
                first_k_dense_replace=arch.get("moe_dense_first", 0), attention_bias=bool(arch.get("qkv_bias")),
                use_qk_norm=bool(arch.get("qk_norm")),
                num_nextn_predict_layers=max(_stored_mtp(arch), arch.get("mtp_num_layers", 0)))


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass(frozen=True)
class Glm4MoeFamily(Family):
    def rules(self, arch) -> list:
        n = arch.num_layers
        return super().rules(arch) + mtp_part(arch.mtp_num_layers, super().rules(arch),
                                              lambda i: f"model.layers.{n + i}.", NEXTN_MTP)

    def build(self, arch, tconfig, padded_vocab: int, seq_length: int, backend, unfuse_norms: bool = False) -> list:
        _note_dropped(arch)
        return super().build(arch, tconfig, padded_vocab, seq_length, backend, unfuse_norms)

    def mtp_layers_supported(self, arch) -> int:
        return _stored_mtp(arch)

    def hf_unused(self, arch, name: str) -> bool:
        """MTP layers beyond model.mtp_num_layers, and the built ones' copies of the embedding and output head
        (megatron-core's MTP layers share the model's own)."""
        layer = _LAYER.match(name)
        if not layer or int(layer.group(1)) < arch.num_layers:
            return False
        return int(layer.group(1)) >= arch.num_layers + arch.mtp_num_layers or name.endswith(_COPIES)


_G = dict(kv_channels=128, vocab_size=151552, max_position_embeddings=131072, rotary_base=1e6, norm_epsilon=1e-5,
          rotary_percent=0.5, moe_router_topk=8, moe_score_function="sigmoid", moe_expert_bias=True, qkv_bias=True)

FAMILY = Glm4MoeFamily(
    name="glm4_moe",
    hf_architectures=("Glm4MoeForCausalLM",),
    hf_model_type="glm4_moe",
    moe=True,
    weights=partial(moe_style, expert_bias=True, shared="shared_experts"),
    hf_read=_read,
    hf_write=_write,
    sizes={
        "tiny": Size(3, 64, 128, 4, 2, kv_channels=32, max_position_embeddings=1024, norm_epsilon=1e-5,
                     rotary_percent=0.5, num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2,
                     moe_shared_ffn_hidden_size=32, moe_score_function="sigmoid", moe_expert_bias=True,
                     moe_topk_scaling_factor=1.5, moe_dense_first=1, qkv_bias=True, qk_norm=True),
        "glm-4.5": Size(92, 5120, 12288, 96, 8, num_experts=160, moe_ffn_hidden_size=1536,
                        moe_shared_ffn_hidden_size=1536, moe_topk_scaling_factor=2.5, moe_dense_first=3,
                        qk_norm=True, **_G),
        "glm-4.5-air": Size(46, 4096, 10944, 96, 8, num_experts=128, moe_ffn_hidden_size=1408,
                            moe_shared_ffn_hidden_size=1408, moe_topk_scaling_factor=1.0, moe_dense_first=1,
                            qk_norm=False, **_G),
    },
)
