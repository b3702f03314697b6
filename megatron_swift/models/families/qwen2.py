"""Qwen2 / Qwen2.5: GQA with biases on the QKV projection, SwiGLU, RoPE."""
from functools import partial

from megatron_swift.convert.tables import llama_style
from megatron_swift.models.families.base import Family, Size

_Q = dict(max_position_embeddings=32768, rotary_base=1e6, norm_epsilon=1e-6)

FAMILY = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_type="qwen2",
    add_qkv_bias=True,
    weights=partial(llama_style, qkv_bias=True),
    sizes={
        "tiny": Size(2, 64, 128, 4, 2, max_position_embeddings=1024, untie_embeddings=False),
        "0.5b": Size(24, 896, 4864, 14, 2, vocab_size=151936, untie_embeddings=False, **_Q),
        "1.5b": Size(28, 1536, 8960, 12, 2, vocab_size=151936, untie_embeddings=False, **_Q),
        "3b": Size(36, 2048, 11008, 16, 2, vocab_size=151936, untie_embeddings=False, **_Q),
        "7b": Size(28, 3584, 18944, 28, 4, vocab_size=152064, **_Q),
        "14b": Size(48, 5120, 13824, 40, 8, vocab_size=152064, **_Q),
        "32b": Size(64, 5120, 27648, 40, 8, vocab_size=152064, **_Q),
        "72b": Size(80, 8192, 29568, 64, 8, vocab_size=152064, **_Q),
    },
)
