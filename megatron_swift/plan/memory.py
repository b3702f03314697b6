"""Per-rank memory of a training layout, from the architecture alone.

Parameters are counted as megatron-core allocates them (local or TE specs
alike): per decoder layer the norms (replicated), fused QKV and output
projections (split over TP), the MLP (fc1 = gate+up and fc2 split over TP) or,
for an MoE layer, the router (replicated), this rank's ``experts / ep`` experts
(split over expert-TP) and any shared experts (split over TP, their gate replicated); the embedding on the first stage and the output layer
(its own, or the tied copy when PP>1) and final norm on the last, split over
TP by the padded vocabulary. The rank reported is the largest stage.

Bytes per parameter, as the trainer sets things up (training/optim.py):
weights in the compute dtype (2 for bf16/fp16, 4 for fp32); gradients in an
fp32 buffer (grad_reduce_in_fp32) = 4; optimizer Adam moments 8, plus an fp32
main copy 4 for bf16/fp16, divided over the data- and context-parallel ranks
with the distributed optimizer (experts over their expert-data-parallel ranks).

Activations per micro-batch and layer follow Korthikanti et al. (2022),
"Reducing Activation Recomputation in Large Transformer Models", with s the
sequence, b the micro-batch, h hidden, a heads, t = TP (the ``5·a·s/h`` score
terms only for megatron-core's local attention, which stores them): no recompute
``s·b·h·(34 + 5·a·s/h)/t`` with sequence parallelism (``s·b·h·(10 + 24/t +
5·a·s/(h·t))`` without); selective (core attention recomputed)
``34·s·b·h/t`` (``s·b·h·(10 + 24/t)``); full: the layer input ``2·s·b·h``
(/t with SP) per layer plus one layer's full set while it is recomputed. The
first pipeline stage holds ``min(pp, micro-batches)`` micro-batches in flight
(1F1B); the last stage adds fp32 logits ``4·s·b·V/t``. These are estimates
(GPT-style MLP constants; SwiGLU and GQA differ a little), meant for ranking;
weights, gradients and optimizer state are exact up to bucket padding.

A VLM's first stage also holds its vision encoder and projector (:func:`vision_params`; their TP split as
megatron-core makes it); a frozen encoder (the default) has no gradients or optimizer state and, run without
gradients, keeps no activations; a training one keeps ``34·T·h_v`` per layer and image (one image per row).
A tower held whole (Arch.vision_hf: Qwen2.5-VL, Qwen3-VL, InternVL) adds, on every first-stage rank, what autograd keeps through it
for a micro-batch's images (Family.tower_activation_bytes, exact for its ops): the images of a row are
Layout.tower_images (tools/plan.py: ``--images-per-row`` images, each the largest data.max_pixels allows).

A frozen model of another architecture the task holds (GKD's teacher, :class:`FrozenModel`) adds its weights
only, in the compute dtype, as its own layout places them: a tensor-parallel size of its own (one pipeline
stage, its vocabulary padded for that size), or the run's (the same stage as the rank's).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

GIB = 2**30


@dataclass(frozen=True)
class FrozenModel:
    """A frozen model of its own architecture the task holds beside the trained one (GKD's teacher)."""

    arch: object
    tp: Optional[int] = None
    """Its own tensor-parallel size (one pipeline stage); None: the run's layout."""
    vocab_divisible_by: int = 128
    """model.make_vocab_size_divisible_by (its vocabulary is padded to a multiple of this x its TP)."""


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    sp: bool = False
    distributed_optimizer: bool = True
    recompute: str = "none"  # none, selective, full
    micro_batch_size: int = 1
    num_microbatches: int = 1
    cp: int = 1
    cp_comm: str = "a2a"
    train_vision: bool = False  # VLMs: whether the vision encoder trains (frozen by default)
    # Frozen copies of the policy's weights the task holds (a DPO/KTO/GRPO reference: 1; CPO, SimPO, ORPO, a
    # precomputed reference or LoRA's own base: 0): weights only, no gradients, optimizer state or activations.
    reference_copies: int = 0
    frozen: Optional[FrozenModel] = None  # a frozen model of another architecture (task.teacher): weights only
    # A held tower (Arch.vision_hf): the (t, h, w) patch grids of one row's images (the planner's worst case:
    # images_per_row images at data.max_pixels, Family.tower_image_grid), whether the merger trains
    # (train.freeze without projector), and whether transformers' eager attention runs (attention_backend=local).
    tower_images: Tuple[Tuple[int, int, int], ...] = ()
    train_projector: bool = True
    tower_eager: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def expert_dp(self) -> int:
        return max(1, self.world // (self.pp * self.ep * self.etp))


def layout_of(cfg, world: int, arch=None, images_per_row: int = 1) -> Layout:
    """The Layout of a run's config on ``world`` ranks (``arch``: the model, for a held tower's images:
    :func:`tower_fields`)."""
    par, train = cfg.parallel, cfg.train
    dp = world // (par.tp * par.pp * par.cp)
    return Layout(tp=par.tp, pp=par.pp, ep=par.ep, etp=par.etp if par.etp is not None else par.tp, dp=dp,
                  sp=par.sp, distributed_optimizer=par.distributed_optimizer, recompute=train.recompute,
                  micro_batch_size=train.micro_batch_size,
                  num_microbatches=train.global_batch_size // (train.micro_batch_size * dp), cp=par.cp,
                  cp_comm=par.cp_comm, train_vision=train.train_vision, reference_copies=reference_copies(cfg),
                  frozen=frozen_model_of(cfg), **(tower_fields(cfg, arch, images_per_row) if arch is not None else {}))


def tower_fields(cfg, arch, images_per_row: int = 1) -> dict:
    """Layout fields of a held tower (Arch.vision_hf) under ``cfg``: ``images_per_row`` images each the largest
    data.max_pixels allows, and no longer than train.seq_length / images_per_row tokens (a micro-batch row's
    worst case; min_pixels only raises small images up to it),
    whether the merger trains, and the attention transformers runs (eager for model.attention_backend=local)."""
    if getattr(arch, "vision_hf", None) is None:
        return {}
    # an image longer than a row is dropped by the data: a row's share of train.seq_length bounds its tokens
    grid = arch.family.tower_image_grid(arch, cfg.data.get("max_pixels"),
                                        cfg.train.seq_length // max(1, images_per_row))
    return dict(tower_images=(tuple(grid),) * images_per_row if grid else (),
                train_projector="projector" not in (cfg.train.freeze or []),
                tower_eager=cfg.model.attention_backend == "local")


def reference_copies(cfg) -> int:
    """How many frozen copies of the policy ``cfg``'s task builds (its class's ``reference_copies``; 0 if it
    names none)."""
    from megatron_swift.tasks import task_class

    count = getattr(task_class(cfg.task.name), "reference_copies", None)
    return count(cfg) if count else 0


def frozen_model_of(cfg) -> Optional[FrozenModel]:
    """The frozen model of another architecture ``cfg``'s task holds (its class's ``frozen_model``), or None."""
    from megatron_swift.tasks import task_class

    find = getattr(task_class(cfg.task.name), "frozen_model", None)
    return find(cfg) if find else None


def frozen_weights(layout: Layout, stage: int, precision: str) -> int:
    """Bytes of the weights of ``layout.frozen`` on a rank of pipeline stage ``stage`` of the run."""
    from megatron_swift.models.arch import padded_vocab_size

    model = layout.frozen
    if model is None:
        return 0
    if model.tp is not None:
        layout, stage = Layout(tp=model.tp, etp=model.tp, dp=layout.world // model.tp), 0
    padded = padded_vocab_size(model.arch.vocab_size, model.vocab_divisible_by, layout.tp)
    n = stage_params(dataclasses.replace(model.arch, vision=None), padded, dataclasses.replace(layout, frozen=None),
                     stage)
    return (n["dense"] + n["expert"]) * (2 if precision in ("bf16", "fp16") else 4)


def layer_params(arch, layout: Layout, moe: Optional[bool] = None) -> Dict[str, int]:
    """Parameters of one decoder layer on one rank: {"dense": n, "expert": n}; ``moe``: whether the layer has
    routed experts (None: whether the model does; a model may have dense layers among its MoE layers)."""
    h, t = arch.hidden_size, layout.tp
    q, kv = arch.num_attention_heads * arch.kv_channels, arch.num_query_groups * arch.kv_channels
    dense = 2 * h  # two norms: before attention and MLP, or after them (OLMo 2)
    dense += h * (q + 2 * kv) // t + q * h // t
    if arch.uses_qkv_bias:
        dense += (q + 2 * kv) // t
    if arch.uses_qk_norm:  # per head, or over the whole projections (OLMo 2: split over TP with the heads)
        dense += (q + kv) // t if arch.decoder_family.qk_norm_whole else 2 * arch.kv_channels
    expert = 0
    if arch.is_moe if moe is None else moe:
        dense += arch.num_experts * h  # router (its expert bias is a buffer)
        expert = (arch.num_experts // layout.ep) * 3 * arch.moe_ffn_hidden_size * h // layout.etp
        if arch.moe_shared_ffn_hidden_size:  # shared experts: a dense MLP split over TP, and its gate
            dense += 3 * arch.moe_shared_ffn_hidden_size * h // t + (h if arch.moe_shared_expert_gate else 0)
    else:
        dense += 3 * arch.ffn_hidden_size * h // t
    return {"dense": dense, "expert": expert}


def vision_params(arch, layout: Layout) -> Dict[str, int]:
    """A VLM's encoder and projector on one first-stage rank: {"encoder": n, "projector": n} (zeros otherwise)."""
    if getattr(arch, "vision_hf", None) is not None:  # a tower held whole on every TP rank: the family counts it
        return arch.family.tower_params(arch)
    v = arch.vision
    if v is None:
        return {"encoder": 0, "projector": 0}
    h, f, t = v.hidden_size, v.ffn_hidden_size, layout.tp
    # Per layer: two LayerNorms; QKV and fc1 (weights and biases) split over TP; proj and fc2 weights split,
    # their biases replicated.
    layer = 4 * h + (3 * h * h + 3 * h) // t + h * h // t + h + (h * f + f) // t + f * h // t + h
    embed = 3 * v.patch_size ** 2 * h + v.encoder_tokens * h  # patch convolution, position embeddings
    embed += 3 * h if v.class_token else h  # class token + ln_pre (CLIP), the patch bias (SigLIP)
    H = arch.hidden_size
    projector = (h * H + H) // t + H * H // t + H
    return {"encoder": v.num_layers * layer + embed, "projector": projector}


def stage_params(arch, padded_vocab: int, layout: Layout, stage: int) -> Dict[str, int]:
    """Parameters held by a rank of pipeline stage ``stage`` ("frozen": those of them that do not train)."""
    layers = arch.num_layers // layout.pp
    kinds = arch.moe_layer_pattern or [None] * arch.num_layers  # this stage's layers: a contiguous block
    indices = range(stage * layers, (stage + 1) * layers)
    # a family may count its own layers (MLA: families/deepseek.py)
    per_layer = [arch.decoder_family.layer_params(arch, layout, i)
                 or layer_params(arch, layout, kinds[i] if kinds[i] is None else bool(kinds[i])) for i in indices]
    dense, expert = sum(p["dense"] for p in per_layer), sum(p["expert"] for p in per_layer)
    vocab_block = padded_vocab * arch.hidden_size // layout.tp
    frozen = 0
    if stage == 0:
        dense += vocab_block
        vision = vision_params(arch, layout)
        dense += vision["encoder"] + vision["projector"]
        frozen = 0 if layout.train_vision else vision["encoder"]
    if stage == layout.pp - 1:
        dense += arch.hidden_size  # final norm
        if arch.untie_embeddings or layout.pp > 1:
            dense += vocab_block
        if arch.mtp_num_layers:  # MTP layers: like the last decoder layer, plus eh_proj (over TP) and 3 norms
            last = (arch.decoder_family.layer_params(arch, layout, arch.num_layers - 1)
                    or layer_params(arch, layout, kinds[-1] if kinds[-1] is None else bool(kinds[-1])))
            h = arch.hidden_size
            dense += arch.mtp_num_layers * (last["dense"] + 2 * h * h // layout.tp + 3 * h)
            expert += arch.mtp_num_layers * last["expert"]
            if layout.pp > 1:
                dense += vocab_block  # the stage's own copy of the embedding, for the next tokens
    return {"dense": dense, "expert": expert, "frozen": frozen}


def activation_bytes(arch, padded_vocab: int, layout: Layout, seq_length: int, stage: int,
                     scores: bool = False, precision: str = "bf16") -> int:
    """Context parallelism: a rank holds s/cp tokens of every row (``s`` below). The ``5·a·s/h`` term of
    the formulas is the attention's stored ``s x s`` scores, softmax and dropout mask: only megatron-core's
    local attention keeps them (``scores=True``; a rank's heads' share of the whole sequence under CP);
    the flash / SDPA kernels of te and sdpa keep none."""
    s, b, h, a, t = seq_length // layout.cp, layout.micro_batch_size, arch.hidden_size, arch.num_attention_heads, layout.tp
    sp, full_s = layout.sp and t > 1, (seq_length if scores else 0)
    if layout.recompute == "full":
        stored = 2 * s * b * h / (t if sp else 1)
        full = s * b * h * (34 + 5 * a * full_s / h) / t if sp else s * b * h * (10 + 24 / t + 5 * a * full_s / (h * t))
        per_layer, extra = stored, full
    elif layout.recompute == "selective":
        per_layer, extra = (34 * s * b * h / t if sp else s * b * h * (10 + 24 / t)), 0
    else:
        per_layer = (s * b * h * (34 + 5 * a * full_s / h) / t if sp
                     else s * b * h * (10 + 24 / t + 5 * a * full_s / (h * t)))
        extra = 0
    in_flight = min(layout.pp - stage, layout.num_microbatches)  # 1F1B: stage k holds pp - k micro-batches
    total = per_layer * (arch.num_layers // layout.pp) * in_flight + extra
    if stage == layout.pp - 1:
        total += 4 * s * b * padded_vocab / t
    if stage == 0 and arch.vision is not None and layout.train_vision:
        v = arch.vision
        total += 34 * v.encoder_tokens * v.hidden_size * v.num_layers * b * in_flight
    if stage == 0:
        total += tower_activation_bytes(arch, layout, precision) * in_flight
    return int(total)


def tower_activation_bytes(arch, layout: Layout, precision: str = "bf16") -> int:
    """A held tower's saved activations for one micro-batch (its rows' Layout.tower_images), on every TP rank
    of the first stage (the tower is replicated): the family's count (e.g. families/qwen2_5_vl.py)."""
    if getattr(arch, "vision_hf", None) is None or not layout.tower_images:
        return 0
    grids = list(layout.tower_images) * layout.micro_batch_size
    return arch.family.tower_activation_bytes(arch, grids, layout.train_vision, layout.train_projector,
                                              layout.tower_eager, 2 if precision in ("bf16", "fp16") else 4)


@dataclass(frozen=True)
class RankMemory:
    """Bytes on the most loaded rank."""

    params: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    stage: int
    reference: int = 0
    """Weights of the task's frozen reference copies (Layout.reference_copies)."""
    frozen: int = 0
    """Weights of the task's frozen model of another architecture on this rank (Layout.frozen: GKD's teacher)."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.reference + self.frozen


def rank_memory(arch, padded_vocab: int, layout: Layout, seq_length: int, precision: str = "bf16",
                stage: Optional[int] = None) -> RankMemory:
    """Memory of a rank of ``stage`` (default: the stage needing the most)."""
    if stage is None:
        return max((rank_memory(arch, padded_vocab, layout, seq_length, precision, k) for k in range(layout.pp)),
                   key=lambda m: m.total)
    n = stage_params(arch, padded_vocab, layout, stage)
    count = n["dense"] + n["expert"]
    trained_dense = n["dense"] - n["frozen"]  # frozen parameters get no gradient buffer or optimizer state
    low = precision in ("bf16", "fp16")
    per_param_optimizer = 8 + (4 if low else 0)
    if layout.distributed_optimizer:  # dense state is sharded over the DP x CP group
        optimizer = per_param_optimizer * (trained_dense / (layout.dp * layout.cp) + n["expert"] / layout.expert_dp)
    else:
        optimizer = per_param_optimizer * (trained_dense + n["expert"])
    weights = count * (2 if low else 4)
    return RankMemory(params=count, weights=weights, grads=(trained_dense + n["expert"]) * 4,
                      optimizer=int(optimizer),
                      activations=activation_bytes(arch, padded_vocab, layout, seq_length, stage,
                                                   precision=precision), stage=stage,
                      reference=layout.reference_copies * weights, frozen=frozen_weights(layout, stage, precision))
