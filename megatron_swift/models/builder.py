"""Build this rank's megatron-core GPTModel chunk(s) from a resolved architecture.

Layering (one-way, tests/test_import_layers.py): this module reads a resolved architecture (a models.arch.Arch,
duck-typed: it does not import models.arch) and the traits of its family object; model families
(models/families) call into it, and models.arch (which resolves a config through the family registry) sits
above both."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_swift.backend import Backend
from megatron_swift.models import rope
from megatron_swift.models.attention import use_core_attention
from megatron_swift.models.norm import swap_torch_norms, unfuse_layernorm_linears
from megatron_swift.models.reward_head import RewardHead
from megatron_swift.models.vocab_mask import mask_padded_logits

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, backend: Backend) -> str:
    """``auto`` is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    if precision == "auto":
        return "bf16" if backend.device == "cuda" else "fp32"
    return precision


def _no_init(weight: torch.Tensor) -> None:
    """Leave the weight as allocated (it is overwritten by loaded values)."""


def transformer_config(arch, cfg, backend: Backend, initialize: bool = True) -> TransformerConfig:
    """megatron-core TransformerConfig for this run: architecture, layout, precision, recompute.

    ``initialize=False`` leaves the weights' values unset, for models whose every weight is loaded next
    (converters): the init functions become no-ops. (perform_initialization=False is not used: in
    megatron-core 0.16 it also skips setting the tensor-parallel attributes of the weights.)"""
    model, par, train = cfg.model, cfg.parallel, cfg.train
    precision = resolve_precision(train.precision, backend)
    dtype = _DTYPES[precision]
    kwargs = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.uses_qkv_bias,
        qk_layernorm=arch.uses_qk_norm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp if (par.vpp or 1) > 1 else None,
        sequence_parallel=par.sp,
        context_parallel_size=par.cp,
        # TE's own CP exchange; outside TE, a2a is the project's Ulysses (models.ulysses).
        cp_comm_type=({"allgather": "all_gather"}.get(par.cp_comm, par.cp_comm)
                      if backend.attention == "te" and par.cp > 1 else None),
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp if par.etp is not None else par.tp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu_initialization=backend.device == "cpu",
        perform_initialization=True,
        # Loss is a sum over tokens divided by the global token count (finalize_model_grads).
        calculate_per_token_loss=True,
        apply_rope_fusion=backend.use_te,
        bias_activation_fusion=backend.use_te,
        masked_softmax_fusion=backend.use_te,
        gradient_accumulation_fusion=backend.wgrad_fusion,
        cross_entropy_loss_fusion=backend.fused_cross_entropy,
        cross_entropy_fusion_impl="native",
        deallocate_pipeline_outputs=True,
        batch_p2p_comm=backend.batch_p2p_comm,
    )
    if not initialize:
        kwargs.update(init_method=_no_init, output_layer_init_method=_no_init, embedding_init_method=_no_init)
    if train.recompute != "none":
        kwargs.update(recompute_granularity=train.recompute)
        if train.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=train.recompute_num_layers)
    if train.fp8:
        kwargs.update(fp8=train.fp8, fp8_recipe="delayed")
    if arch.is_moe:
        kwargs.update(
            num_moe_experts=arch.num_experts,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size,
            moe_router_topk=arch.moe_router_topk,
            moe_token_dispatcher_type=model.moe_token_dispatcher,
            moe_aux_loss_coeff=model.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
            # LoRA adapts each expert's own linears: SequentialMLP, not TE's grouped GEMM.
            moe_grouped_gemm=backend.use_te and cfg.tuner.name != "lora",
            moe_router_pre_softmax=arch.moe_router_pre_softmax,
            moe_router_dtype="fp32",
            **_moe_layout(arch, model),
        )
    if arch.mtp_num_layers:
        kwargs.update(mtp_num_layers=arch.mtp_num_layers, mtp_loss_scaling_factor=model.mtp_loss_weight)
    kwargs.update(arch.decoder_family.transformer_fields(arch))
    if arch.family is not arch.decoder_family:  # a VLM's own fields (M-RoPE's sections) over its text family's
        kwargs.update(arch.family.transformer_fields(arch))
    # Multi-latent attention's ranks and head dims are fields of megatron-core's MLATransformerConfig.
    config_class = MLATransformerConfig if kwargs.get("multi_latent_attention") else TransformerConfig
    return config_class(**kwargs)


def _moe_layout(arch, model) -> dict:
    """megatron-core settings of the MoE axes beyond routed experts (families/base.Size documents them)."""
    kwargs = dict(moe_router_score_function=arch.moe_score_function,
                  moe_router_topk_scaling_factor=arch.moe_topk_scaling_factor)
    if arch.moe_layer_pattern is not None:  # dense layers among the MoE ones: megatron-core's per-layer list
        kwargs.update(moe_layer_freq=arch.moe_layer_pattern)
    if arch.moe_shared_ffn_hidden_size:
        kwargs.update(moe_shared_expert_intermediate_size=arch.moe_shared_ffn_hidden_size,
                      moe_shared_expert_gate=arch.moe_shared_expert_gate)
    if arch.moe_expert_bias:
        # The checkpoint's bias is used as it is unless aux-loss-free updates are asked for (default rate 0).
        kwargs.update(moe_router_enable_expert_bias=True,
                      moe_router_bias_update_rate=model.moe_expert_bias_update_rate)
    if arch.moe_num_groups and arch.moe_num_groups > 1:
        kwargs.update(moe_router_num_groups=arch.moe_num_groups, moe_router_group_topk=arch.moe_group_topk)
    return kwargs


def mtp_block_spec(tconfig: TransformerConfig, block_spec, backend: Backend, stage):
    """megatron-core's multi-token-prediction block spec (None without MTP, or on a stage that holds none of its
    layers): each MTP layer's transformer layer is the decoder's last layer spec, after the norm and attention
    swaps above; its own norms are swapped the same way."""
    if not tconfig.mtp_num_layers:
        return None
    spec = get_gpt_mtp_block_spec(tconfig, block_spec, use_transformer_engine=backend.use_te, vp_stage=stage)
    if spec is not None and not backend.use_te:
        swap_torch_norms(spec)
    return spec


class MTPGPTModel(GPTModel):
    """megatron-core 0.16.1's GPTModel whose multi-token-prediction layers run only when asked for.

    Workaround: with ``mtp_num_layers`` set, GPTModel._postprocess always runs the MTP block and adds its loss
    to the backward (MTPLossAutoScaler), and without labels fails on ``labels.clone()``. Here MTP runs when the
    caller passes labels and a ``loss_mask`` (the lm task's forward step, training.forward_step, whose loss is the
    per-token one MTP's is scaled like); every other call (logits for evaluation and rollouts, reference and
    preference log-probs) runs the main head only, as inference would."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        wanted = labels is not None and kwargs.get("loss_mask") is not None
        if wanted or self.config.mtp_num_layers is None:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        kwargs["mtp_in_postprocess"] = False
        saved, self.config.mtp_num_layers = self.config.mtp_num_layers, None
        try:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        finally:
            self.config.mtp_num_layers = saved


def build_model(arch, tconfig: TransformerConfig, padded_vocab: int, seq_length: int,
                backend: Backend, unfuse_norms: bool = False) -> list:
    """This rank's model chunks, one per virtual pipeline stage, as the family builds them (GPTModels, or a
    VLM's models.vlm.VisionLanguageModel)."""
    return arch.family.build(arch, tconfig, padded_vocab, seq_length, backend, unfuse_norms)


def build_gpt_chunks(arch, tconfig: TransformerConfig, padded_vocab: int, seq_length: int,
                     backend: Backend, unfuse_norms: bool = False, scatter_sp: bool = True) -> List[GPTModel]:
    """One GPTModel per virtual pipeline stage held by this rank (one when vpp is off).

    ``unfuse_norms`` (LoRA on Transformer Engine): separate norm modules instead of TE's
    LayerNorm-fused linears, so that an adapter sees the normalised input its linear sees.
    ``scatter_sp=False``: the embedding output stays whole under sequence parallelism (a VLM places image
    features into it first, then scatters)."""
    vpp = tconfig.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if vpp > 1 else None
        block_spec = get_gpt_decoder_block_spec(tconfig, use_transformer_engine=backend.use_te, vp_stage=stage)
        if not backend.use_te:
            swap_torch_norms(block_spec)
        elif unfuse_norms:
            unfuse_layernorm_linears(block_spec)
        use_core_attention(block_spec, backend.attention, tconfig.context_parallel_size)
        model = MTPGPTModel(
            config=tconfig,
            transformer_layer_spec=block_spec,
            vocab_size=padded_vocab,
            max_sequence_length=max(arch.max_position_embeddings, seq_length),
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            # A reward head is its own weight even in models whose LM head is tied to the embedding.
            share_embeddings_and_output_weights=not arch.untie_embeddings and arch.head == "lm",
            # every RoPE type: scaled ones through rope.install below; M-RoPE (three position streams,
            # [3, b, s] position ids) when the family sets the config's mrope_section
            position_embedding_type="mrope" if tconfig.mrope_section else "rope",
            rotary_base=arch.rotary_base,
            rotary_percent=arch.rotary_percent,
            scatter_embedding_sequence_parallel=scatter_sp,
            vp_stage=stage,
            mtp_block_spec=mtp_block_spec(tconfig, block_spec, backend, stage),
        )
        if arch.rope_scaling is not None:
            rope.install(model, arch)
        if arch.head == "reward" and model.post_process:
            model.output_layer = RewardHead(tconfig)
        elif model.post_process and arch.vocab_size and padded_vocab > arch.vocab_size:
            mask_padded_logits(model.output_layer, arch.vocab_size, padded_vocab)
        model.to(backend.torch_device)
        chunks.append(model)
    return chunks
