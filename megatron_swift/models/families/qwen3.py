"""Qwen3 dense: GQA with per-head RMSNorm on queries and keys, SwiGLU, RoPE, no biases."""
from functools import partial

from megatron_swift.convert.tables import llama_style
from megatron_swift.models.families.base import Family, Size

_Q = dict(kv_channels=128, vocab_size=151936, max_position_embeddings=40960, rotary_base=1e6, norm_epsilon=1e-6)

FAMILY = Family(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    hf_model_type="qwen3",
    qk_layernorm=True,
    weights=partial(llama_style, qk_norm=True),
    sizes={
        "tiny": Size(2, 64, 128, 4, 2, kv_channels=16, max_position_embeddings=1024, untie_embeddings=False),
        "0.6b": Size(28, 1024, 3072, 16, 8, untie_embeddings=False, **_Q),
        "1.7b": Size(28, 2048, 6144, 16, 8, untie_embeddings=False, **_Q),
        "4b": Size(36, 2560, 9728, 32, 8, untie_embeddings=False, **_Q),
        "8b": Size(36, 4096, 12288, 32, 8, **_Q),
        "14b": Size(40, 5120, 17408, 40, 8, **_Q),
        "32b": Size(64, 5120, 25600, 64, 8, **_Q),
    },
)
