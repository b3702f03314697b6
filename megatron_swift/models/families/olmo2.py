"""OLMo 2 (Olmo2ForCausalLM): no norm before attention or MLP, an RMSNorm on each of their outputs before the
residual add (post_attention_layernorm, post_feedforward_layernorm), and RMSNorm over the whole query and key
projections (all heads together); otherwise Llama's layer (RoPE, SwiGLU, no biases). Both norm placements are
megatron-core workarounds in models/post_norm.py, chosen here by the family's axes."""
from megatron_swift.convert import hf_config as hc
from megatron_swift.convert.tables import olmo2_style
from megatron_swift.models.families.base import Family, Size


def _read(hf: dict, where: str) -> dict:
    hc.check_keys(hf, where, {
        "attention_bias": (lambda v: not v, "biases on q/k/v/o projections are not supported; only false"),
        "hidden_act": (lambda v: v == "silu", "only silu"),
    })
    return {}


def _write(arch: dict) -> dict:
    return dict(attention_bias=False)


_O = dict(vocab_size=100352, max_position_embeddings=4096, rotary_base=5e5, norm_epsilon=1e-6)

FAMILY = Family(
    name="olmo2",
    hf_architectures=("Olmo2ForCausalLM",),
    hf_model_type="olmo2",
    qk_layernorm=True,
    qk_norm_whole=True,
    norm_placement="post",
    weights=olmo2_style,
    hf_read=_read,
    hf_write=_write,
    sizes={
        "tiny": Size(2, 64, 128, 4, 2, max_position_embeddings=1024),
        "1b": Size(16, 2048, 8192, 16, 16, **_O),  # OLMo-2-0425-1B
        "7b": Size(32, 4096, 11008, 32, 32, **_O),  # OLMo-2-1124-7B
        "13b": Size(40, 5120, 13824, 40, 40, **_O),  # OLMo-2-1124-13B
        "32b": Size(64, 5120, 27648, 40, 8, **_O),  # OLMo-2-0325-32B
    },
)
