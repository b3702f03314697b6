"""Phi-3 / Phi-4 (Phi3ForCausalLM): Llama's layer (GQA, SwiGLU, RMSNorm, no biases) whose checkpoints fuse the
q/k/v projections into ``qkv_proj`` and gate/up into ``gate_up_proj`` (convert.tables.phi3_style splits and joins
them); partial rotary where partial_rotary_factor says so (Phi-4-mini: 0.75). LongRoPE (rope_scaling type
``longrope``: Phi-3.5, Phi-4-mini's 128K configs) chooses its frequencies by each batch's length in transformers;
it is refused by models/rope.py's table, naming the key. Sliding-window attention (sliding_window shorter than
max_position_embeddings) is refused likewise."""
from megatron_swift.convert import hf_config as hc
from megatron_swift.convert.tables import phi3_style
from megatron_swift.models.families.base import Family, Size


def _read(hf: dict, where: str) -> dict:
    longest = hf.get("max_position_embeddings", 4096)
    hc.check_keys(hf, where, {
        # a window as long as the context changes nothing (Phi-4-mini writes 262144 for 131072 positions)
        "sliding_window": (lambda v: v >= longest, f"sliding-window attention is not supported; null or at least "
                                                   f"max_position_embeddings ({longest})"),
        "hidden_act": (lambda v: v == "silu", "only silu"),
    })
    return {}


def _write(arch: dict) -> dict:
    # Phi3Config's default pad_token_id is 32000 (Phi-3's vocabulary); a smaller vocabulary has no such row.
    return dict(sliding_window=None, pad_token_id=None)


# Phi-4-mini: its config's longrope extension to 131072 positions is not built here (see above): 4096 positions,
# its original_max_position_embeddings.
_MINI = dict(vocab_size=200064, max_position_embeddings=4096, rotary_base=1e4, norm_epsilon=1e-5, rotary_percent=0.75,
             untie_embeddings=False)
_PHI4 = dict(vocab_size=100352, max_position_embeddings=16384, rotary_base=2.5e5, norm_epsilon=1e-5)

FAMILY = Family(
    name="phi3",
    hf_architectures=("Phi3ForCausalLM",),
    hf_model_type="phi3",
    weights=phi3_style,
    hf_read=_read,
    hf_write=_write,
    sizes={
        "tiny": Size(2, 64, 128, 4, 2, max_position_embeddings=1024, norm_epsilon=1e-5, rotary_percent=0.75),
        "phi-4-mini": Size(32, 3072, 8192, 24, 8, **_MINI),
        "phi-4": Size(40, 5120, 17920, 40, 10, **_PHI4),
    },
)
