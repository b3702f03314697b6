"""GLM-4.5 / GLM-4.6 (Glm4MoeForCausalLM): GQA with QKV biases (attention_bias), optional per-head QK norm
(use_qk_norm) and partial rotary; the first first_k_dense_replace layers dense, the others routed SwiGLU
experts chosen by sigmoid scores plus a correction bias (e_score_correction_bias), weights renormalised and
scaled by routed_scaling_factor, plus shared experts.

Multi-token prediction: checkpoints store num_nextn_predict_layers MTP layers as model.layers.{N + i}. They
are not built yet: loading drops them with a printed line, and an export with the source folder copies them
back unchanged (hf_unused). The hook for building them is _mtp_layers / hf_unused below."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial

from megatron_swift.convert import hf_config as hc
from megatron_swift.convert.tables import moe_style
from megatron_swift.models.families.base import Family, Size

_REPORTED = set()


def _mtp_layers(hf: dict, where: str) -> int:
    """How many MTP layers the checkpoint stores (said once per folder: they are dropped)."""
    count = hf.get("num_nextn_predict_layers") or 0
    if count and where not in _REPORTED and int(os.environ.get("RANK", "0")) == 0:
        _REPORTED.add(where)
        print(f"{where}: num_nextn_predict_layers={count}: the multi-token-prediction layers "
              f"(model.layers.{hf['num_hidden_layers']}..) are not loaded or trained; an export with this "
              "folder as its source writes them back unchanged", flush=True)
    return count


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
    _mtp_layers(hf, where)
    fields = hc.routed_fields(hf, "n_routed_experts", "moe_intermediate_size", norm_topk_default=True)
    shared = hf.get("n_shared_experts") or 0
    fields.update(moe_shared_ffn_hidden_size=shared * hf["moe_intermediate_size"] or None,
                  moe_score_function="sigmoid", moe_expert_bias=True,
                  moe_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
                  moe_num_groups=groups if groups > 1 else None,
                  moe_group_topk=hf.get("topk_group") if groups > 1 else None,
                  moe_dense_first=hf.get("first_k_dense_replace", 0),
                  qkv_bias=bool(hf.get("attention_bias", False)), qk_norm=bool(hf.get("use_qk_norm", False)))
    return fields


def _write(arch: dict) -> dict:
    width = arch["moe_ffn_hidden_size"]
    keys = hc.routed_keys(arch, "n_routed_experts", "moe_intermediate_size")
    return dict(keys, norm_topk_prob=True, n_shared_experts=(arch.get("moe_shared_ffn_hidden_size") or 0) // width,
                routed_scaling_factor=arch.get("moe_topk_scaling_factor") or 1.0,
                n_group=arch.get("moe_num_groups") or 1, topk_group=arch.get("moe_group_topk") or 1,
                first_k_dense_replace=arch.get("moe_dense_first", 0), attention_bias=bool(arch.get("qkv_bias")),
                use_qk_norm=bool(arch.get("qk_norm")), num_nextn_predict_layers=0)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Glm4MoeFamily(Family):
    def hf_unused(self, arch, name: str) -> bool:
        """The MTP layers after the decoder's (model.layers.{num_layers + i}.*): not built yet."""
        layer = _LAYER.match(name)
        return bool(layer and int(layer.group(1)) >= arch.num_layers)


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
