"""megatron-core DDP wrapping, optimizer (optionally distributed) and LR/WD scheduler."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_swift.backend import collective_device
from megatron_swift.backend.no_apex import fuse_adam
from megatron_swift.tuners import part_lr


def frozen_model(chunks, tconfig):
    """A model that only runs forward (a reference, a judge, a teacher): wrapped for bf16/fp16 as the trained
    one is (``wrap_model``), in eval mode, with no gradients."""
    if tconfig.bf16 or tconfig.fp16:
        chunks = [Float16Module(tconfig, c) for c in chunks]
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks


def wrap_model(chunks, tconfig, par):
    """Float16Module for bf16/fp16, then megatron-core DDP; hooks the schedules need go on ``tconfig``."""
    if tconfig.bf16 or tconfig.fp16:
        chunks = [Float16Module(tconfig, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.distributed_optimizer,
        # Per-token loss: gradients are summed over DP and divided by the global token count.
        average_in_collective=False,
    )
    wrapped = [
        # Only the first chunk buckets; later VPP chunks reduce when their backward ends.
        DistributedDataParallel(tconfig, ddp_config, c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    no_sync = [m.no_sync for m in wrapped]
    tconfig.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    if par.overlap_grad_reduce:
        sync = [m.start_grad_sync for m in wrapped]
        tconfig.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if par.overlap_param_gather:
        psync = [m.start_param_sync for m in wrapped]
        tconfig.param_sync_func = psync[0] if len(psync) == 1 else psync
    return wrapped


def build_optimizer(model, tconfig, train, par):
    """Adam(W) from megatron-core (torch's fused kernel without Apex/TE: backend.no_apex); fp32 main params and
    grads for bf16/fp16 runs."""
    config = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=tconfig.bf16,
        fp16=tconfig.fp16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=par.distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
        initial_loss_scale=2**16 if tconfig.fp16 else None,
    )
    optimizer = get_megatron_optimizer(config, model, config_overrides=_overrides(config, model, train))
    fuse_adam(optimizer)
    return optimizer


def _overrides(config, model, train):
    """megatron-core's standard groups (no weight decay on biases and 1-D parameters), plus none on a matrix that
    trains only its new-token rows (models/new_tokens.py): decay would move the rows it must leave unchanged;
    plus a VLM's parts with their own learning rate (train.vision_lr / projector_lr, tuners/part_lr.py).
    None (megatron-core's default) when there is neither on any rank."""
    from megatron.core.optimizer import ParamGroupOverride, ParamKey, get_standard_config_overrides

    mine = torch.tensor([float(any(getattr(p, "new_rows_only", False) for c in model for p in c.parameters()))],
                        device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(mine)  # every rank must build the same parameter groups
    parts = part_lr.overrides(train)  # from the config: the same on every rank
    if not mine.item() and not parts:
        return None
    rows = {ParamKey(attr="new_rows_only"): ParamGroupOverride(wd_mult=0.0)} if mine.item() else {}
    return {**get_standard_config_overrides(config), **rows, **parts}


def build_scheduler(optimizer, train, total_iters: int) -> OptimizerParamScheduler:
    """Linear warmup, then cosine/linear decay to min_lr (or constant) over lr_decay_iters."""
    decay_iters = train.lr_decay_iters or max(total_iters, 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, train.lr_warmup_iters + 1),
        lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=max(decay_iters, 1),
        wd_incr_style="constant",
        # On resume the schedule in force is this run's config (a changed lr, min_lr, warmup or decay is
        # applied and reported by the resume check); only the position (num_steps) comes from the checkpoint.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
