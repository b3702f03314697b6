"""Qwen3-MoE: Qwen3 attention with every MLP replaced by routed SwiGLU experts (no shared expert)."""
from functools import partial

from megatron_swift.convert.tables import moe_style
from megatron_swift.models.families.base import Family, Size

_Q = dict(kv_channels=128, vocab_size=151936, max_position_embeddings=40960, rotary_base=1e6, norm_epsilon=1e-6)

FAMILY = Family(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_model_type="qwen3_moe",
    qk_layernorm=True,
    moe=True,
    weights=partial(moe_style, qk_norm=True),
    sizes={
        "tiny": Size(2, 64, 128, 4, 2, kv_channels=16, max_position_embeddings=1024,
                     num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2),
        # Published Qwen3-MoE configs set norm_topk_prob=true: softmax over the top-k logits.
        "30b-a3b": Size(48, 2048, 6144, 32, 4, num_experts=128, moe_ffn_hidden_size=768, moe_router_topk=8, **_Q),
        "235b-a22b": Size(94, 4096, 12288, 64, 4, num_experts=128, moe_ffn_hidden_size=1536, moe_router_topk=8, **_Q),
    },
)
