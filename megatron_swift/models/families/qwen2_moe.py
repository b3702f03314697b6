"""Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM): Qwen2 attention (QKV biases) with routed SwiGLU experts plus
a shared expert scaled by a sigmoid gate; decoder_sparse_step and mlp_only_layers make some layers dense."""
from functools import partial

from megatron_swift.convert import hf_config as hc
from megatron_swift.convert.tables import moe_style
from megatron_swift.models.families.base import Family, Size


def _read(hf: dict, where: str) -> dict:
    hc.check_keys(hf, where, {"use_sliding_window": (lambda v: not v, "sliding-window attention is not supported")})
    fields = dict(hc.routed_fields(hf, "num_experts", "moe_intermediate_size"), **hc.sparse_step_fields(hf))
    shared = hf.get("shared_expert_intermediate_size") or None
    fields.update(moe_shared_ffn_hidden_size=shared, moe_shared_expert_gate=bool(shared))
    if "qkv_bias" in hf:  # transformers 5 writes it (true in every published model)
        fields.update(qkv_bias=bool(hf["qkv_bias"]))
    return fields


def _write(arch: dict) -> dict:
    return dict(hc.routed_keys(arch, "num_experts", "moe_intermediate_size"), **hc.sparse_step_keys(arch),
                shared_expert_intermediate_size=arch.get("moe_shared_ffn_hidden_size") or 0)


_Q = dict(vocab_size=151936, rotary_base=1e6, norm_epsilon=1e-6)

FAMILY = Family(
    name="qwen2_moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
    hf_model_type="qwen2_moe",
    add_qkv_bias=True,
    moe=True,
    weights=partial(moe_style, qkv_bias=True, shared="shared_expert", shared_gate=True),
    hf_read=_read,
    hf_write=_write,
    sizes={
        "tiny": Size(2, 64, 128, 4, 2, max_position_embeddings=1024, num_experts=4, moe_ffn_hidden_size=32,
                     moe_router_topk=2, moe_router_pre_softmax=True, moe_shared_ffn_hidden_size=64,
                     moe_shared_expert_gate=True),
        # Published configs set norm_topk_prob=false: top-k of a softmax over all experts.
        "1.5-moe-a2.7b": Size(24, 2048, 5632, 16, 16, max_position_embeddings=8192, num_experts=60,
                              moe_ffn_hidden_size=1408, moe_router_topk=4, moe_router_pre_softmax=True,
                              moe_shared_ffn_hidden_size=5632, moe_shared_expert_gate=True, **_Q),
        "57b-a14b": Size(28, 3584, 18944, 28, 4, max_position_embeddings=32768, num_experts=64,
                         moe_ffn_hidden_size=2560, moe_router_topk=8, moe_router_pre_softmax=True,
                         moe_shared_ffn_hidden_size=20480, moe_shared_expert_gate=True, **_Q),
    },
)
