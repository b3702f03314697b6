"""DeepSeek-V2 / V3 (and V2-Lite, V2.5, V3.1, R1, Moonlight, Kimi-K2): multi-head latent attention (MLA), dense
first layers, then routed SwiGLU experts plus shared experts.

Built from megatron-core 0.16.1's own blocks: ``MLASelfAttention`` (``MLATransformerConfig``: q_lora_rank,
kv_lora_rank, nope/rope/v head dims, its own RoPE or YaRN with ``mscale``/``mscale_all_dim``), ``MoELayer`` with
``SharedExpertMLP``, the router's ``softmax`` (V2) or ``sigmoid`` + ``expert_bias`` (V3) scores, group-limited
top-k and ``moe_router_topk_scaling_factor``; ``moe_layer_freq`` as a list makes the first
``first_k_dense_replace`` layers dense.

MLA's numbers (and what an export writes back) live in ``Arch.family_options`` (a plain dict, :class:`Options`);
the MoE layout and router are the shared MoE axes of families.base.Size (:func:`moe_axes`). What megatron-core's
router computes differently from transformers is refused when reading config.json, one line naming the key
(:func:`_check_routing`). Multi-token-prediction layers (V3's ``model.layers.{N+i}``, those the folder stores) are
megatron-core's MTP layers (convert.tables.NEXTN_MTP); ``model.mtp_num_layers`` builds fewer (a printed line),
and an export from the folder writes the dropped ones, and the layers' copies of the embedding and head, back
unchanged.

FP8 checkpoints (``quantization_config.quant_method=fp8``, V3/R1/Kimi-K2 as published) are dequantized while
reading (convert/fp8.py); an export writes the training dtype and no ``quantization_config``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Optional

from megatron_swift.convert.tables import NEXTN_MTP, deepseek_style, mtp_part
from megatron_swift.data.errors import DataError
from megatron_swift.models.families.base import Family, Size
from megatron_swift.models.rope import RopeScaling

V2, V3 = "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"


@dataclass(frozen=True)
class Options:
    """DeepSeek's architecture numbers beyond the common ones (HF config.json key names)."""

    q_lora_rank: Optional[int]  # None: queries are projected directly (V2-Lite, Moonlight)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    first_k_dense_replace: int = 0  # the first k layers have a dense MLP (intermediate_size)
    n_shared_experts: int = 0  # shared experts, fused into one MLP of moe_intermediate_size x n
    scoring_func: str = "softmax"  # softmax (V2) or sigmoid (V3, with e_score_correction_bias)
    n_group: int = 1  # expert groups; topk_group of them are chosen per token
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    hf_architecture: str = V3  # which HF class (export writes it back)
    num_nextn_predict_layers: int = 0  # MTP layers the checkpoint stores (model.mtp_num_layers builds up to these)


def options(arch) -> Options:
    return Options(**arch.family_options)


def moe_axes(opts, moe_ffn_hidden_size: int) -> dict:
    """The MoE layout and router (families.base.Size's MoE axes) of DeepSeek's numbers: dense first layers,
    shared experts fused into one MLP, softmax (V2) or sigmoid with the correction bias (V3), groups, scaling."""
    o = opts if isinstance(opts, Options) else Options(**opts)
    grouped = o.n_group > 1
    return dict(moe_dense_first=o.first_k_dense_replace, moe_score_function=o.scoring_func,
                moe_router_pre_softmax=o.scoring_func == "softmax", moe_expert_bias=o.scoring_func == "sigmoid",
                moe_shared_ffn_hidden_size=moe_ffn_hidden_size * o.n_shared_experts or None,
                moe_topk_scaling_factor=o.routed_scaling_factor if o.routed_scaling_factor != 1.0 else None,
                moe_num_groups=o.n_group if grouped else None, moe_group_topk=o.topk_group if grouped else None)


class DeepSeekFamily(Family):
    def read_hf(self, hf: dict, folder: str) -> dict:
        from megatron_swift.convert.hf_config import arch_fields, stored_nextn_layers

        where = os.path.join(folder, "config.json")
        hf = dict(hf)
        arch_name = next(a for a in hf.get("architectures") or [V3] if a in self.hf_architectures)
        experts = hf.get("n_routed_experts")
        opts = Options(
            q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
            qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], first_k_dense_replace=hf.get("first_k_dense_replace", 0) if experts else 0,
            n_shared_experts=hf.get("n_shared_experts") or 0,
            scoring_func=hf.get("scoring_func", "sigmoid" if arch_name == V3 else "softmax"),
            n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1,
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", arch_name == V3)), hf_architecture=arch_name,
            num_nextn_predict_layers=stored_nextn_layers(hf, folder))
        _check(hf, opts, where)
        # arch_fields reads the common keys; MoE ones are DeepSeek's own names (n_routed_experts), read here.
        fields = arch_fields({k: v for k, v in hf.items() if k not in ("num_experts", "num_local_experts")}, folder)
        # MLA has no key/value groups (every head has its own key and value from the shared latent).
        fields.update(family_options=dataclasses.asdict(opts), num_query_groups=hf["num_attention_heads"],
                      mtp_num_layers=opts.num_nextn_predict_layers,
                      kv_channels=opts.qk_nope_head_dim + opts.qk_rope_head_dim)
        if experts:
            fields.update(num_experts=experts, moe_ffn_hidden_size=hf["moe_intermediate_size"],
                          moe_router_topk=hf["num_experts_per_tok"], **moe_axes(opts, hf["moe_intermediate_size"]))
        return fields

    def write_hf(self, arch: dict, dtype: str) -> dict:
        from megatron_swift.convert.hf_config import to_hf_config

        opts = Options(**arch["family_options"])
        config = to_hf_config(self, arch, dtype)
        for key in ("num_experts", "decoder_sparse_step", "mlp_only_layers"):
            config.pop(key, None)
        config.update(architectures=[opts.hf_architecture],
                      model_type="deepseek_v2" if opts.hf_architecture == V2 else "deepseek_v3",
                      head_dim=opts.qk_rope_head_dim, num_key_value_heads=arch["num_attention_heads"],
                      **{k: v for k, v in dataclasses.asdict(opts).items() if k != "hf_architecture"})
        if arch.get("num_experts"):
            config.update(n_routed_experts=arch["num_experts"], moe_intermediate_size=arch["moe_ffn_hidden_size"],
                          num_experts_per_tok=arch["moe_router_topk"])
        if opts.hf_architecture == V2:
            config["topk_method"] = "group_limited_greedy" if opts.n_group > 1 else "greedy"
        return config

    def transformer_fields(self, arch) -> dict:
        """MLA and DeepSeek routing as megatron-core's TransformerConfig (MLATransformerConfig) fields."""
        opts = options(arch)
        fields = dict(multi_latent_attention=True, q_lora_rank=opts.q_lora_rank, kv_lora_rank=opts.kv_lora_rank,
                      qk_head_dim=opts.qk_nope_head_dim, qk_pos_emb_head_dim=opts.qk_rope_head_dim,
                      v_head_dim=opts.v_head_dim, qk_layernorm=True,  # MLA's q/kv latent norms
                      rotary_base=arch.rotary_base, rotary_scaling_factor=1.0, apply_rope_fusion=False,
                      rope_type="rope")
        yarn = arch.rope_scaling
        if yarn is not None:  # checked in _check: only YaRN
            both = bool(yarn.mscale and yarn.mscale_all_dim)  # transformers applies mscale only with both
            fields.update(rope_type="yarn", rotary_scaling_factor=yarn.factor,
                          original_max_position_embeddings=yarn.original_max_position_embeddings
                          or arch.max_position_embeddings,
                          beta_fast=yarn.beta_fast or 32.0, beta_slow=yarn.beta_slow or 1.0,
                          mscale=yarn.mscale if both else 1.0, mscale_all_dim=yarn.mscale_all_dim or 0.0)
        return fields

    def build(self, arch, tconfig, padded_vocab: int, seq_length: int, backend, unfuse_norms: bool = False) -> list:
        from megatron_swift.models import mla_rope_grad
        from megatron_swift.models.builder import build_gpt_chunks

        # MLA builds its own rotary embedding (plain or YaRN) from the TransformerConfig: the GPT-level RoPE
        # replacement (models.rope.install) does not apply.
        _note_dropped(arch)
        mla_rope_grad.install()  # megatron-core 0.16.1: the rotary key's gradient under TP without TE
        with _mla_without_te(backend.use_te):
            return build_gpt_chunks(dataclasses.replace(arch, rope_scaling=None), tconfig, padded_vocab,
                                    seq_length, backend, unfuse_norms)

    def rules(self, arch) -> list:
        rules = deepseek_style(q_lora=options(arch).q_lora_rank is not None, tied=not arch.untie_embeddings,
                               head=arch.head)
        n = arch.num_layers
        return rules + mtp_part(arch.mtp_num_layers, rules, lambda i: f"model.layers.{n + i}.", NEXTN_MTP)

    def mtp_layers_supported(self, arch) -> int:
        return options(arch).num_nextn_predict_layers

    def layout_problems(self, arch, parallel) -> list:
        opts, tp = options(arch), parallel.tp
        problems = []
        # megatron-core splits the down-projections' outputs over TP (then gathers them)
        for key, width in (("q_lora_rank", opts.q_lora_rank),
                           ("kv_lora_rank + qk_rope_head_dim", opts.kv_lora_rank + opts.qk_rope_head_dim)):
            if width is not None and width % tp:
                problems.append(f"parallel.tp={tp} does not divide the model's {key}={width} (MLA's down-projections "
                                "are split over TP ranks): choose a tp that divides it")
        if parallel.cp > 1:
            problems.append(f"parallel.cp={parallel.cp}: context parallelism is not supported for multi-head "
                            "latent attention (+model=deepseek) yet; use parallel.cp=1")
        return problems

    def layer_macs(self, arch, seq_length: int) -> float:
        """MLA: the query path (through its LoRA or direct), the KV down- and up-projections, scores over the
        query/key width and values over the value width (full s x s, as the generic formula), the output
        projection; then a dense SwiGLU MLP (first layers) or routed top-k experts, shared experts and router."""
        o, h, n = options(arch), arch.hidden_size, arch.num_attention_heads
        qk, v = o.qk_nope_head_dim + o.qk_rope_head_dim, o.v_head_dim
        query = h * o.q_lora_rank + o.q_lora_rank * n * qk if o.q_lora_rank else h * n * qk
        attention = (query + h * (o.kv_lora_rank + o.qk_rope_head_dim) + o.kv_lora_rank * n * (o.qk_nope_head_dim + v)
                     + seq_length * n * (qk + v) + n * v * h)
        dense, moe = 3 * h * arch.ffn_hidden_size, 0.0
        if arch.is_moe:
            f = arch.moe_ffn_hidden_size
            moe = arch.moe_router_topk * 3 * h * f + 3 * h * (arch.moe_shared_ffn_hidden_size or 0) + h * arch.num_experts
        k = arch.num_layers - arch.moe_layers
        return arch.num_layers * attention + k * dense + (arch.num_layers - k) * moe

    def layer_params(self, arch, layout, index: int) -> dict:
        """As megatron-core allocates them: the down-projections (column-parallel) and up-projections split over
        TP, the latent norms replicated; a dense MLP, or router + shared experts (over TP) + this rank's experts."""
        o, h, n, t = options(arch), arch.hidden_size, arch.num_attention_heads, layout.tp
        qk, v = o.qk_nope_head_dim + o.qk_rope_head_dim, o.v_head_dim
        query = (h * o.q_lora_rank // t + o.q_lora_rank + o.q_lora_rank * n * qk // t if o.q_lora_rank
                 else h * n * qk // t)
        dense = (2 * h + query + h * (o.kv_lora_rank + o.qk_rope_head_dim) // t + o.kv_lora_rank
                 + o.kv_lora_rank * n * (o.qk_nope_head_dim + v) // t + n * v * h // t)
        expert = 0
        pattern = arch.moe_layer_pattern
        if arch.is_moe and (pattern is None or pattern[index]):
            f = arch.moe_ffn_hidden_size
            dense += arch.num_experts * h + 3 * h * (arch.moe_shared_ffn_hidden_size or 0) // t
            expert = (arch.num_experts // layout.ep) * 3 * f * h // layout.etp
        else:
            dense += 3 * arch.ffn_hidden_size * h // t
        return {"dense": dense, "expert": expert}

    def hf_unused(self, arch, name: str) -> bool:
        """MTP layers beyond model.mtp_num_layers (model.layers.{N+i}.*), and the built ones' copies of the
        embedding and output head (megatron-core's MTP layers share the model's own)."""
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if not layer or int(layer.group(1)) < arch.num_layers:
            return False
        return (int(layer.group(1)) >= arch.num_layers + arch.mtp_num_layers
                or name.endswith(("embed_tokens.weight", "shared_head.head.weight")))


_NOTED = set()


def _note_dropped(arch) -> None:
    """One printed line (first rank, once) when model.mtp_num_layers leaves some of the checkpoint's MTP layers out."""
    stored = options(arch).num_nextn_predict_layers
    if stored > arch.mtp_num_layers and stored not in _NOTED and os.environ.get("RANK", "0") == "0":
        _NOTED.add(stored)
        print(f"model: model.mtp_num_layers={arch.mtp_num_layers}: {stored - arch.mtp_num_layers} of the checkpoint's "
              f"{stored} multi-token-prediction layer(s) (model.layers.{arch.num_layers + arch.mtp_num_layers}..) are "
              "not built or trained; an export from this folder writes them back unchanged", flush=True)


@contextlib.contextmanager
def _mla_without_te(use_te: bool):
    """Workaround for megatron-core 0.16.1 without Transformer Engine: its extensions module then defines the TE
    classes on a MagicMock and multi_latent_attention still sets HAVE_TE (the import did not fail), so
    MLASelfAttention's ``isinstance(self.linear_proj, TELinear)`` raises TypeError. While the model is built
    without TE, the module's flag says what is true: TE is not there."""
    from megatron.core.transformer import multi_latent_attention as mla

    saved = mla.HAVE_TE
    mla.HAVE_TE = saved and use_te
    try:
        yield
    finally:
        mla.HAVE_TE = saved


def _check(hf: dict, opts: Options, where: str) -> None:
    """What megatron-core 0.16.1 does not compute as transformers does: one line naming the key."""
    def refuse(message: str):
        raise DataError(where, None, message)

    if opts.hf_architecture == V3 and hf.get("rope_interleave") is False:
        refuse("rope_interleave=false is not supported (megatron-core's MLA rotates DeepSeek's interleaved "
               "layout; supported: true)")
    from megatron_swift.models.rope import read_hf_rope

    scaling: Optional[RopeScaling] = read_hf_rope(hf)[2]
    if scaling is not None and scaling.rope_type != "yarn":
        refuse(f"rope_scaling type '{scaling.rope_type}' is not supported for MLA; supported: default, yarn")
    if scaling is not None and (scaling.attention_factor is not None or scaling.truncate is False):
        refuse("rope_scaling.attention_factor / truncate=false are not supported for MLA (megatron-core's YaRN "
               "derives the factor from mscale/mscale_all_dim)")
    if scaling is not None and scaling.mscale_all_dim and not scaling.mscale:
        refuse("rope_scaling.mscale_all_dim without mscale is not supported for MLA; set both (as DeepSeek does)")
    if hf.get("n_routed_experts"):
        _check_routing(hf, opts, refuse)


def _check_routing(hf: dict, opts: Options, refuse) -> None:
    topk = hf["num_experts_per_tok"]
    if opts.scoring_func not in ("softmax", "sigmoid"):
        refuse(f"scoring_func={opts.scoring_func!r} is not supported; supported: softmax, sigmoid")
    if opts.scoring_func == "sigmoid" and not opts.norm_topk_prob and topk > 1:
        refuse("norm_topk_prob=false with sigmoid scoring is not supported (megatron-core normalises the top-k "
               "sigmoid scores); supported: true")
    if opts.scoring_func == "softmax" and opts.norm_topk_prob:
        refuse("norm_topk_prob=true with softmax scoring is not supported (transformers' DeepSeek-V2 ignores it, "
               "DeepSeek's own code applies it); supported: false")
    method = hf.get("topk_method", "greedy" if opts.scoring_func == "softmax" else "noaux_tc")
    if opts.scoring_func == "softmax" and method not in ("greedy", "group_limited_greedy"):
        refuse(f"topk_method={method!r} is not supported; supported: greedy, group_limited_greedy")
    grouped = opts.n_group > 1 and (opts.scoring_func == "sigmoid" or method == "group_limited_greedy")
    if grouped:
        # megatron-core scores a group by the sum of its top (topk // topk_group) experts; transformers by its
        # best expert (V2) or the sum of its top two (V3).
        wanted = 1 if opts.scoring_func == "softmax" else 2
        if opts.topk_group < 1 or topk // opts.topk_group != wanted:
            refuse(f"n_group={opts.n_group} with topk_group={opts.topk_group} and num_experts_per_tok={topk} is "
                   f"not supported: megatron-core scores a group by its top num_experts_per_tok // topk_group "
                   f"experts, which must be {wanted} here")
    if hf.get("moe_layer_freq", 1) != 1:
        refuse(f"moe_layer_freq={hf['moe_layer_freq']} is not supported; supported: 1")


_V3 = dict(vocab_size=129280, max_position_embeddings=163840, rotary_base=1e4, norm_epsilon=1e-6)
_V3_YARN = RopeScaling("yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                       mscale=1.0, mscale_all_dim=1.0)
_V3_OPTS = dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                first_k_dense_replace=3, n_shared_experts=1, scoring_func="sigmoid", n_group=8, topk_group=4,
                routed_scaling_factor=2.5, norm_topk_prob=True, hf_architecture=V3)
_LITE_OPTS = dict(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  first_k_dense_replace=1, n_shared_experts=2, scoring_func="softmax", n_group=1, topk_group=1,
                  routed_scaling_factor=1.0, norm_topk_prob=False, hf_architecture=V2)
_MOONLIGHT_OPTS = dict(_V3_OPTS, q_lora_rank=None, n_shared_experts=2, n_group=1, topk_group=1,
                       first_k_dense_replace=1, routed_scaling_factor=2.446)

def _size(layers: int, hidden: int, ffn: int, heads: int, **fields) -> Size:
    """A Size whose MoE axes come from its DeepSeek options (MLA: as many key/value heads as heads)."""
    return Size(layers, hidden, ffn, heads, heads, **fields,
                **moe_axes(fields["family_options"], fields["moe_ffn_hidden_size"]))


FAMILY = DeepSeekFamily(
    name="deepseek",
    hf_architectures=(V3, V2),
    hf_model_type="deepseek_v3",
    moe=True,
    qk_layernorm=True,
    weights=deepseek_style,
    sizes={
        "tiny": _size(3, 64, 128, 4, kv_channels=24, max_position_embeddings=1024, num_experts=8,
                      moe_ffn_hidden_size=32, moe_router_topk=2,
                      family_options=dict(_V3_OPTS, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                                          qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_group=1,
                                          topk_group=1)),
        "v2-lite": _size(27, 2048, 10944, 16, kv_channels=192, vocab_size=102400, max_position_embeddings=163840,
                         norm_epsilon=1e-6, num_experts=64, moe_ffn_hidden_size=1408, moe_router_topk=6,
                         family_options=_LITE_OPTS,
                         rope_scaling=RopeScaling("yarn", factor=40.0, original_max_position_embeddings=4096,
                                                  beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)),
        "moonlight-16b-a3b": _size(27, 2048, 11264, 16, kv_channels=192, vocab_size=163840,
                                   max_position_embeddings=8192, rotary_base=5e4, norm_epsilon=1e-5,
                                   num_experts=64, moe_ffn_hidden_size=1408, moe_router_topk=6,
                                   family_options=_MOONLIGHT_OPTS),
        "v3-671b": _size(61, 7168, 18432, 128, kv_channels=192, num_experts=256, moe_ffn_hidden_size=2048,
                         moe_router_topk=8, rope_scaling=_V3_YARN, family_options=_V3_OPTS, **_V3),
    },
)
