"""Mixtral (MixtralForCausalLM): Mistral attention with routed SwiGLU experts in every layer, top-k of the
router's logits renormalised by a softmax; the router's auxiliary load-balancing loss is model.moe_aux_loss_coeff."""
from functools import partial

from megatron_swift.convert import hf_config as hc
from megatron_swift.convert.tables import moe_style
from megatron_swift.models.families.base import Family, Size

_NO_WINDOW = (lambda v: False, "sliding-window attention is not supported; set it to null")


def _read(hf: dict, where: str) -> dict:
    hc.check_keys(hf, where, {"sliding_window": _NO_WINDOW})
    # Each expert is intermediate_size wide; transformers renormalises the top-k softmax weights (always).
    return dict(hc.routed_fields(hf, "num_local_experts", "intermediate_size"), moe_router_pre_softmax=False)


def _write(arch: dict) -> dict:
    keys = hc.routed_keys(arch, "num_local_experts", "intermediate_size")
    keys.pop("norm_topk_prob")
    return dict(keys, sliding_window=None)


_M = dict(vocab_size=32000, max_position_embeddings=32768, rotary_base=1e6, norm_epsilon=1e-5)

FAMILY = Family(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_model_type="mixtral",
    moe=True,
    weights=partial(moe_style, mlp="block_sparse_moe.", expert_names=("w1", "w3", "w2")),
    hf_read=_read,
    hf_write=_write,
    sizes={
        "tiny": Size(2, 64, 96, 4, 2, max_position_embeddings=1024, norm_epsilon=1e-5,
                     num_experts=4, moe_ffn_hidden_size=96, moe_router_topk=2),
        "8x7b": Size(32, 4096, 14336, 32, 8, num_experts=8, moe_ffn_hidden_size=14336, moe_router_topk=2, **_M),
        "8x22b": Size(56, 6144, 16384, 48, 8, num_experts=8, moe_ffn_hidden_size=16384, moe_router_topk=2,
                      **dict(_M, vocab_size=32768, max_position_embeddings=65536)),
    },
)
