"""Qwen3-MoE: Qwen3 attention with routed SwiGLU experts as the MLP (no shared expert); decoder_sparse_step
and mlp_only_layers make some layers dense."""
from functools import partial

from megatron_swift.convert import hf_config as hc
from megatron_swift.convert.tables import moe_style
from megatron_swift.models.families.base import Family, Size

_Q = dict(kv_channels=128, vocab_size=151936, max_position_embeddings=40960, rotary_base=1e6, norm_epsilon=1e-6)


def _read(hf: dict, where: str) -> dict:
    hc.check_keys(hf, where, {"shared_expert_intermediate_size": (lambda v: not v, "Qwen3-MoE has no shared "
                                                                  "expert; a Qwen2-MoE model is Qwen2MoeForCausalLM")})
    # transformers 5 writes num_local_experts (its attribute map), older versions num_experts; the config's
    # norm_topk_prob defaults to False.
    experts = "num_experts" if "num_experts" in hf else "num_local_experts"
    return dict(hc.routed_fields(hf, experts, "moe_intermediate_size"), **hc.sparse_step_fields(hf))


def _write(arch: dict) -> dict:
    return dict(hc.routed_keys(arch, "num_experts", "moe_intermediate_size"), **hc.sparse_step_keys(arch))


FAMILY = Family(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_type="qwen3_moe",
    qk_layernorm=True,
    moe=True,
    weights=partial(moe_style, qk_norm=True),
    hf_read=_read,
    hf_write=_write,
    sizes={
        "tiny": Size(2, 64, 128, 4, 2, kv_channels=16, max_position_embeddings=1024,
                     num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2),
        # Published Qwen3-MoE configs set norm_topk_prob=true: softmax over the top-k logits.
        "30b-a3b": Size(48, 2048, 6144, 32, 4, num_experts=128, moe_ffn_hidden_size=768, moe_router_topk=8, **_Q),
        "235b-a22b": Size(94, 4096, 12288, 64, 4, num_experts=128, moe_ffn_hidden_size=1536, moe_router_topk=8, **_Q),
    },
)
