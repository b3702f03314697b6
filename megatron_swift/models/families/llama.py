"""Llama 2 / Llama 3 and Mistral (same layer): GQA, SwiGLU, RoPE, RMSNorm, no biases."""
from megatron_swift.convert.tables import llama_style
from megatron_swift.models.families.base import Family, Size
from megatron_swift.models.rope import RopeScaling

_L2 = dict(vocab_size=32000, max_position_embeddings=4096, rotary_base=1e4, norm_epsilon=1e-5)
_L3 = dict(vocab_size=128256, max_position_embeddings=8192, rotary_base=5e5, norm_epsilon=1e-5)
# Llama 3.1-3.3: the 3.0 numbers with llama3 RoPE scaling to 128K positions (their config.json's rope_scaling).
_L31 = dict(_L3, max_position_embeddings=131072, rope_scaling=RopeScaling(
    "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))
_L32 = dict(_L31, rope_scaling=RopeScaling(
    "llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192))
_MISTRAL = dict(vocab_size=32768, max_position_embeddings=32768, rotary_base=1e6, norm_epsilon=1e-5)

FAMILY = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    hf_model_type="llama",
    weights=llama_style,
    sizes={
        "tiny": Size(2, 64, 128, 4, 2, max_position_embeddings=1024, norm_epsilon=1e-5),
        "llama2-7b": Size(32, 4096, 11008, 32, 32, **_L2),
        "llama2-13b": Size(40, 5120, 13824, 40, 40, **_L2),
        "llama2-70b": Size(80, 8192, 28672, 64, 8, **_L2),
        # Llama 3.2 sizes
        "llama3-1b": Size(16, 2048, 8192, 32, 8, kv_channels=64, untie_embeddings=False, **_L32),
        "llama3-3b": Size(28, 3072, 8192, 24, 8, kv_channels=128, untie_embeddings=False, **_L32),
        "llama3-8b": Size(32, 4096, 14336, 32, 8, **_L3),
        "llama3-70b": Size(80, 8192, 28672, 64, 8, **_L3),
        "llama3.1-8b": Size(32, 4096, 14336, 32, 8, **_L31),
        "llama3.1-70b": Size(80, 8192, 28672, 64, 8, **_L31),
        "mistral-7b": Size(32, 4096, 14336, 32, 8, **_MISTRAL),
    },
)
