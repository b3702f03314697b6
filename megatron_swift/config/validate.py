"""Checks that run before any process group, model or checkpoint is touched.

Each failure says which key to change. ``validate`` collects every problem so
a user fixes them in one go.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

from omegaconf import OmegaConf

from megatron_swift.config.errors import ConfigError  # noqa: F401 - its old home; many modules import it from here
from megatron_swift.data.errors import DataError
from megatron_swift.models import families
from megatron_swift.models.families.base import CompositionError

MIN_LINE_BYTES = 1024  # data.max_line_bytes below this would refuse ordinary rows


def _choice(problems, key, value, allowed):
    if value not in allowed:
        problems.append(f"{key}={value} is not one of: {', '.join(map(str, allowed))}")


def _layout(cfg, arch, te_available: bool, problems: List[str]) -> None:
    par = cfg.parallel
    for key in ("tp", "pp", "cp", "ep"):
        if getattr(par, key) < 1:
            problems.append(f"parallel.{key}={getattr(par, key)} must be >= 1")
    if problems:
        return
    heads, groups = arch.num_attention_heads, arch.num_query_groups
    if heads % par.tp:
        problems.append(f"parallel.tp={par.tp} does not divide model.num_attention_heads={heads}")
    if groups % par.tp:
        problems.append(f"parallel.tp={par.tp} does not divide model.num_query_groups={groups}")
    if heads % groups:
        problems.append(f"model.num_query_groups={groups} does not divide model.num_attention_heads={heads}")
    vpp = par.vpp or 1
    if arch.num_layers % (par.pp * vpp):
        problems.append(
            f"model.num_layers={arch.num_layers} is not divisible by parallel.pp*parallel.vpp={par.pp}*{vpp}"
        )
    if vpp > 1 and par.pp < 2:
        problems.append(f"parallel.vpp={vpp} needs parallel.pp >= 2")
    if par.sp and par.tp < 2:
        problems.append("parallel.sp=true needs parallel.tp > 1 (sequence parallelism splits over TP ranks)")
    if par.sp and cfg.train.seq_length % par.tp:
        problems.append(f"parallel.tp={par.tp} does not divide train.seq_length={cfg.train.seq_length} (needed by parallel.sp)")
    if par.cp > 1:
        _context_parallel(cfg, arch, _attention(cfg, te_available), problems)
    if par.ep > 1 and not arch.is_moe:
        problems.append(f"parallel.ep={par.ep} needs a MoE model (model.num_experts is not set for {arch.family.name})")
    if arch.is_moe:
        if arch.num_experts % par.ep:
            problems.append(f"parallel.ep={par.ep} does not divide model.num_experts={arch.num_experts}")
        etp = par.etp if par.etp is not None else par.tp
        if arch.moe_ffn_hidden_size % etp:
            key = f"parallel.etp={par.etp}" if par.etp is not None else f"parallel.tp={par.tp} (the expert TP size)"
            problems.append(f"{key} does not divide model.moe_ffn_hidden_size={arch.moe_ffn_hidden_size}; "
                            "set parallel.etp to a divisor of it (1 keeps experts whole)")
        if arch.moe_shared_ffn_hidden_size and arch.moe_shared_ffn_hidden_size % par.tp:
            problems.append(f"parallel.tp={par.tp} does not divide the shared experts' width "
                            f"{arch.moe_shared_ffn_hidden_size}")
        if arch.moe_num_groups and arch.num_experts % arch.moe_num_groups:
            problems.append(f"the expert groups ({arch.moe_num_groups}) do not divide model.num_experts="
                            f"{arch.num_experts}")
        if arch.moe_layer_pattern is not None and not any(arch.moe_layer_pattern):
            problems.append(f"model.num_layers={arch.num_layers} leaves no MoE layer (the family's first "
                            f"{arch.moe_dense_first} layers are dense)")
    problems += arch.decoder_family.layout_problems(arch, par)
    if arch.family is not arch.decoder_family:  # a VLM's own limits (M-RoPE and CP) besides its text family's
        problems += arch.family.layout_problems(arch, par)
    _mtp(cfg, arch, problems)
    if par.overlap_param_gather and not par.distributed_optimizer:
        problems.append("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true")


def _mtp(cfg, arch, problems: List[str]) -> None:
    """Multi-token prediction: no more layers than the family can build (MiMo: those its checkpoint holds)."""
    most = arch.decoder_family.mtp_layers_supported(arch)
    if arch.mtp_num_layers < 0 or arch.mtp_num_layers > most:
        problems.append(f"model.mtp_num_layers={arch.mtp_num_layers} is not supported for +model={arch.family.name}"
                        f" (supported: 0..{most}" + ("" if most else "; this family builds no multi-token-prediction "
                                                      "layers yet") + ")")
    if cfg.model.mtp_loss_weight < 0:
        problems.append(f"model.mtp_loss_weight={cfg.model.mtp_loss_weight} must be >= 0")


CP_COMMS = ("a2a", "p2p", "a2a+p2p", "allgather")


def _context_parallel(cfg, arch, attention: str, problems: List[str]) -> None:
    """What parallel.cp > 1 needs: the exchange the attention backend has, sequence and head divisibility,
    and the inputs the CP path covers so far."""
    par, seq = cfg.parallel, cfg.train.seq_length
    _choice(problems, "parallel.cp_comm", par.cp_comm, CP_COMMS)
    if par.cp_comm != "a2a" and attention != "te":
        problems.append(f"parallel.cp_comm={par.cp_comm} needs Transformer Engine attention "
                        f"(model.attention_backend={attention} has Ulysses only): use parallel.cp_comm=a2a")
    if seq % (2 * par.cp):
        problems.append(f"train.seq_length={seq} is not divisible by 2*parallel.cp={2 * par.cp} (each CP rank "
                        "holds two of the sequence's 2*cp chunks); change one of them")
    if par.cp_comm == "a2a":
        from megatron_swift.models.ulysses import split_problem

        heads, groups = arch.num_attention_heads // par.tp, arch.num_query_groups // par.tp
        problem = split_problem(heads, groups, par.cp)
        if problem == "heads":
            problems.append(f"parallel.cp={par.cp} with cp_comm=a2a needs the attention heads of a TP rank "
                            f"(model.num_attention_heads/tp = {heads}) divisible by cp; lower cp or tp")
        elif problem == "groups":
            problems.append(f"parallel.cp={par.cp} with cp_comm=a2a needs the query groups of a TP rank "
                            f"({groups}) to divide cp or be divisible by it")
    if attention == "te" and cfg.data.packing:
        problems.append("parallel.cp>1 with data.packing=true and Transformer Engine attention is not supported "
                        "yet (THD rows are not partitioned over CP): use model.attention_backend=sdpa or "
                        "data.packing=false")


def _batch(cfg, world_size: Optional[int], problems: List[str]) -> None:
    par, train = cfg.parallel, cfg.train
    model_parallel = par.tp * par.pp * par.cp
    if world_size is not None:
        if world_size % model_parallel:
            problems.append(
                f"world size {world_size} is not divisible by parallel.tp*pp*cp={par.tp}*{par.pp}*{par.cp}; "
                "change the layout or the number of processes"
            )
            return
        dp = world_size // model_parallel
        expert_mp = par.ep * (par.etp if par.etp is not None else par.tp) * par.pp
        if world_size % expert_mp:
            problems.append(f"world size {world_size} is not divisible by parallel.ep*etp*pp={expert_mp}")
        if train.global_batch_size % (train.micro_batch_size * dp):
            problems.append(
                f"train.global_batch_size={train.global_batch_size} is not divisible by "
                f"train.micro_batch_size*dp={train.micro_batch_size}*{dp}"
            )
        elif (par.vpp or 1) > 1 and (train.global_batch_size // (train.micro_batch_size * dp)) % par.pp:
            problems.append(
                f"interleaved pipeline needs the number of micro-batches "
                f"({train.global_batch_size // (train.micro_batch_size * dp)}) to be a multiple of parallel.pp={par.pp}"
            )


def _run(cfg, problems: List[str]) -> None:
    train = cfg.train
    if train.max_epochs is None and train.train_iters is None:
        problems.append("set train.max_epochs or train.train_iters (or both: the run stops at whichever comes first)")
    for key in ("max_epochs", "train_iters"):
        value = getattr(train, key)
        if value is not None and value < 0:
            problems.append(f"train.{key}={value} must be >= 0")
    _choice(problems, "train.lr_decay_style", train.lr_decay_style, ("cosine", "linear", "constant"))
    _choice(problems, "train.precision", train.precision, ("auto", "bf16", "fp16", "fp32"))
    _choice(problems, "train.recompute", train.recompute, ("none", "selective", "full"))
    _choice(problems, "train.device", train.device, ("auto", "cuda", "cpu"))
    _choice(problems, "logging.wandb.mode", cfg.logging.wandb.mode, ("online", "offline", "disabled"))
    if train.fp8 is not None:
        _choice(problems, "train.fp8", train.fp8, ("e4m3", "hybrid"))
    if train.micro_batch_size < 1 or train.seq_length < 1:
        problems.append("train.micro_batch_size and train.seq_length must be >= 1")
    if train.save_hf and not train.save_at_end:
        problems.append("train.save_hf=true needs train.save_at_end=true (it converts the final checkpoint)")
    if train.min_lr > train.lr:
        problems.append(f"train.min_lr={train.min_lr} is above train.lr={train.lr}")
    _guards(train, problems)


def _guards(train, problems: List[str]) -> None:
    """The limits that stop or steer a run: skipped steps, loss spikes, wall-clock budget."""
    if train.max_skipped_steps < 1:
        problems.append(f"train.max_skipped_steps={train.max_skipped_steps} must be >= 1")
    if train.loss_spike_factor is not None and not train.loss_spike_factor > 1:
        problems.append(f"train.loss_spike_factor={train.loss_spike_factor} must be > 1 (a spike is a loss above "
                        "this many times the recent mean), or null to disable the test")
    if train.loss_spike_window < 1:
        problems.append(f"train.loss_spike_window={train.loss_spike_window} must be >= 1")
    if train.exit_duration_minutes is not None and not train.exit_duration_minutes > 0:
        problems.append(f"train.exit_duration_minutes={train.exit_duration_minutes} must be > 0, or null for no limit")


def _wandb(cfg, problems: List[str]) -> None:
    from megatron_swift.observe.wandb_login import wandb_login_problem

    problem = wandb_login_problem(cfg.logging.wandb)
    if problem:
        problems.append(problem)


def _data(cfg, problems: List[str]) -> None:
    from megatron_swift.data.sft import ON_ERROR

    data = cfg.data
    _choice(problems, "data.source", data.source, ("jsonl", "sft", "vl_sft", "indexed", "mock"))
    _choice(problems, "data.on_error", data.on_error, ON_ERROR)  # every JSONL reader applies it
    if data.max_line_bytes < MIN_LINE_BYTES:
        problems.append(f"data.max_line_bytes={data.max_line_bytes} must be >= {MIN_LINE_BYTES} (the longest JSONL "
                        "line accepted, in bytes)")
    if data.source in ("sft", "vl_sft"):
        _sft(cfg, problems)
    if data.weights:
        if len(data.weights) != len(data.path):
            problems.append(f"data.weights has {len(data.weights)} entries for {len(data.path)} data.path entries")
        if any(w <= 0 for w in data.weights):
            problems.append("data.weights must all be > 0")
        if data.source == "indexed" and cfg.train.train_iters is None:
            problems.append("data.weights on indexed data needs train.train_iters (a weighted blend is built with "
                            "train_iters x global_batch_size samples; it has no natural epoch)")
        if data.source not in ("indexed", "sft", "vl_sft"):
            problems.append(f"data.weights applies to data.source=indexed, sft or vl_sft, not {data.source}")
    if data.source == "mock":
        return
    if not data.path:
        problems.append(f"data.path is empty; give the {data.source} file(s) to train on")
    for path in list(data.path) + list(data.eval_path):
        files = [path + ".bin", path + ".idx"] if data.source == "indexed" else [path]
        for file in files:
            if not os.path.isfile(file):
                problems.append(f"data file not found: {file} (data.path)")


def _sft(cfg, problems: List[str]) -> None:
    from megatron_swift.data.conversations import FORMATS
    from megatron_swift.data.sft import LOSS_ON, TRUNCATION

    data = cfg.data
    _choice(problems, "data.format", data.format, FORMATS)
    _choice(problems, "data.loss_on", data.loss_on, LOSS_ON)
    _choice(problems, "data.truncation", data.truncation, TRUNCATION)
    if data.streaming and data.source == "vl_sft":
        problems.append("data.streaming is not supported with data.source=vl_sft yet")
    elif data.streaming:
        if cfg.train.train_iters is None:
            problems.append("data.streaming has no sample count known up front: set train.train_iters "
                            "(train.max_epochs does not apply to a stream)")
        if data.weights:
            problems.append("data.weights is not supported with data.streaming yet")


def _task(cfg, problems: List[str]) -> None:
    """The task's own checks (tasks/base.py: each registered task validates its config)."""
    from megatron_swift.tasks import TASKS

    _choice(problems, "task.name", cfg.task.name, tuple(TASKS))
    if cfg.task.name in TASKS:
        TASKS[cfg.task.name].validate(cfg, problems)


def _tuner(cfg, arch, problems: List[str]) -> None:
    from megatron_swift.tuners import FREEZE_GROUPS, LORA_TARGETS

    tuner, train = cfg.tuner, cfg.train
    _choice(problems, "tuner.name", tuner.name, ("none", "lora"))
    for key in ("train.freeze_regex", "train.trainable_regex", "tuner.target_regex"):
        pattern = OmegaConf.select(cfg, key)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                problems.append(f"{key}={pattern!r} is not a valid regex: {e}")
    for group in train.freeze:
        if group not in FREEZE_GROUPS:
            problems.append(f"train.freeze: unknown group '{group}'; choose from {', '.join(FREEZE_GROUPS)}")
    if tuner.name != "lora":
        return
    _choice(problems, "tuner.export", tuner.export, ("merged", "adapter"))
    if tuner.rank < 1:
        problems.append(f"tuner.rank={tuner.rank} must be >= 1")
    if not 0 <= tuner.dropout < 1:
        problems.append(f"tuner.dropout={tuner.dropout} must be in [0, 1)")
    for name in tuner.target_modules:
        if name not in LORA_TARGETS + ("all-linear",):
            problems.append(f"tuner.target_modules: unknown module '{name}'; choose from "
                            f"{', '.join(LORA_TARGETS)} or all-linear (or use tuner.target_regex)")
    if not (cfg.model.pretrained or cfg.model.load):
        problems.append("tuner=lora trains adapters on given weights: set model.pretrained (HF folder) or "
                        "model.load (checkpoint); the base is read from there again on resume and export")
    if tuner.export == "adapter" and arch.is_moe and _adapts_experts(tuner):
        problems.append("tuner.export=adapter: a PEFT adapter cannot hold MoE expert adapters (transformers keeps "
                        "each layer's experts in fused tensors, not per-expert linears); use tuner.export=merged, "
                        "or keep the experts out of the targets (tuner.target_regex)")
    if arch.is_moe and (cfg.parallel.etp if cfg.parallel.etp is not None else cfg.parallel.tp) != 1:
        problems.append("tuner=lora on a MoE model needs parallel.etp=1 (expert adapters are not split over "
                        "an expert tensor-parallel group)")


def _adapts_experts(tuner) -> bool:
    """Whether LoRA would adapt routed experts' linears (linear_fc1/linear_fc2 under mlp.experts)."""
    expert = "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1"
    if tuner.target_regex is not None:
        try:
            return re.fullmatch(tuner.target_regex, expert) is not None
        except re.error:
            return False  # reported as a bad regex above
    return bool({"all-linear", "linear_fc1", "linear_fc2"} & set(tuner.target_modules))


def _part_lrs(train, arch, family: str, problems: List[str]) -> None:
    """train.vision_lr / train.projector_lr: a learning rate >= 0 for a part that exists and trains."""
    for part in ("vision", "projector"):
        key, value = f"train.{part}_lr", getattr(train, f"{part}_lr")
        if value is None:
            continue
        if not arch.has_vision:
            problems.append(f"{key}={value}: a vision-language model's {part} learning rate; +model={family} "
                            "has no vision tower (remove it)")
        elif value < 0:
            problems.append(f"{key}={value} must be >= 0")
        elif part in train.freeze or (part == "vision" and not train.train_vision):
            fix = ("set train.train_vision=true and leave " if part == "vision" else "leave ") + part
            fix += " out of train.freeze"
            problems.append(f"{key}={value}: the {part} group is frozen ({fix}, or remove {key})")


def _image_tasks(name: str, arch, problems: List[str]) -> None:
    """A VLM trains only with the tasks that pass images to it (each task's ``takes_images``)."""
    from megatron_swift.tasks import TASKS

    task = TASKS.get(name)
    if not arch.has_vision or task is None or getattr(task, "takes_images", False):
        return
    able = ", ".join(n for n, t in sorted(TASKS.items()) if getattr(t, "takes_images", False))
    problems.append(f"task={name} does not take images: {task.no_images_why}; a vision-language model trains "
                    f"with task={able}")


def _vision(cfg, arch, problems: List[str]) -> None:
    """Vision-language models (+model=llava) and image data."""
    model = cfg.model
    if cfg.data.source == "vl_sft" and not arch.has_vision:
        problems.append(f"data.source=vl_sft needs a vision-language model (+model=llava, qwen2_5_vl, qwen3_vl, "
                        f"qwen3_vl_moe or internvl), not +model={model.family}")
    for key in ("min_pixels", "max_pixels"):
        value = cfg.data.get(key)
        if value is not None and (arch.vision_hf is None or value <= 0):
            problems.append(f"data.{key}={value}: a positive pixel count, for a native-resolution VLM "
                            "(+model=qwen2_5_vl)" + ("" if arch.vision_hf is not None else f", not +model={model.family}"))
    _image_tasks(cfg.task.name, arch, problems)
    _part_lrs(cfg.train, arch, model.family, problems)
    if model.llm and model.pretrained:
        problems.append("model.pretrained (an HF LLaVA folder) and model.llm + model.vision (one composed from an "
                        "LLM and a vision encoder) are alternatives: set one")
    if model.vision_feature_layer is not None and not model.llm:
        problems.append("model.vision_feature_layer applies to a VLM composed with model.llm + model.vision; "
                        "a checkpoint's comes from its config.json")
    data = cfg.data
    for key in ("video_fps", "video_max_frames", "video_min_pixels", "video_max_pixels"):
        value = data.get(key)
        if value is not None and value <= 0:
            problems.append(f"data.{key}={value}: must be positive (or null for the model folder's own)")
    if None not in (data.get("min_pixels"), data.get("max_pixels")) and data.min_pixels > data.max_pixels:
        problems.append(f"data.min_pixels={data.min_pixels} is above data.max_pixels={data.max_pixels}")
    if arch.vision is None:
        return
    from megatron_swift.models.vision_arch import image_seq_length

    vision, tp = arch.vision, cfg.parallel.tp
    _choice(problems, "model.vision_select", arch.vision_select, ("default", "full"))
    if vision.num_attention_heads % tp:
        problems.append(f"parallel.tp={tp} must divide the vision encoder's {vision.num_attention_heads} heads")
    if vision.image_size % vision.patch_size:
        problems.append(f"the vision encoder's image size {vision.image_size} is not a multiple of its patch size "
                        f"{vision.patch_size}")
    tokens = image_seq_length(vision, arch.vision_select)
    if cfg.train.seq_length <= tokens:
        problems.append(f"train.seq_length={cfg.train.seq_length} must hold an image's {tokens} tokens and text")


def _new_tokens(model, problems: List[str]) -> None:
    """model.new_tokens / new_token_init / new_token_init_text / init_strategy (models/new_tokens.py)."""
    from megatron_swift.models.init_names import STRATEGY_NAMES, TOKEN_INITS

    if model.init_strategy is not None:
        _choice(problems, "model.init_strategy", model.init_strategy, STRATEGY_NAMES)
    tokens = list(model.new_tokens)
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token.strip():
            problems.append(f"model.new_tokens[{i}] is empty: give each new token some text, e.g. '<tool_call>'")
        elif token != token.strip():
            problems.append(f"model.new_tokens[{i}]={token!r} has surrounding spaces: write it without them")
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        problems.append(f"model.new_tokens lists {', '.join(map(repr, repeated))} more than once")
    _choice(problems, "model.new_token_init", model.new_token_init, TOKEN_INITS)
    texts = list(model.new_token_init_text)
    if not tokens and (texts or model.new_token_init != "mean"):
        key = "model.new_token_init_text" if texts else f"model.new_token_init={model.new_token_init}"
        problems.append(f"{key} applies to the rows of model.new_tokens, which is empty: list the tokens to add "
                        "in model.new_tokens or drop it")
    if tokens and model.new_token_init == "text" and (len(texts) != len(tokens) or not all(t and t.strip()
                                                                                             for t in texts)):
        problems.append(f"model.new_token_init=text needs model.new_token_init_text with one non-empty text per "
                        f"new token ({len(tokens)}), e.g. ['tool call','end tool call']; it has {len(texts)}")
    if tokens and texts and model.new_token_init != "text":
        problems.append(f"model.new_token_init_text is used only with model.new_token_init=text "
                        f"(now {model.new_token_init})")
    if tokens and getattr(model, "llm", None):
        problems.append("model.new_tokens with a VLM composed from model.llm + model.vision is not supported yet: "
                        "add the tokens to the LLM's tokenizer first, or start from an HF LLaVA folder")


def _attention(cfg, te_available: bool) -> str:
    from megatron_swift.models.attention import resolve

    return resolve(cfg.model.attention_backend, te_available)


def _backend(cfg, te_available: bool, device: str, problems: List[str]) -> None:
    from megatron_swift.models.attention import BACKENDS

    _choice(problems, "model.attention_backend", cfg.model.attention_backend, BACKENDS)
    if cfg.model.attention_backend == "te" and not te_available:
        problems.append("model.attention_backend=te needs Transformer Engine on CUDA; use auto, sdpa or local, or "
                        "install the [te] extra")
    if cfg.data.packing and _attention(cfg, te_available) == "te" and cfg.train.micro_batch_size != 1:
        problems.append(f"data.packing with Transformer Engine (THD) takes one packed row per micro-batch: set "
                        f"train.micro_batch_size=1 (now {cfg.train.micro_batch_size}) and raise train.seq_length")
    if cfg.train.fp8 and not te_available:
        problems.append("train.fp8 needs Transformer Engine on CUDA; unset train.fp8 or install the [te] extra")
    if device == "cpu" and cfg.train.precision == "fp16":
        problems.append("train.precision=fp16 is not supported on CPU; use fp32 or bf16")


def _moe_on_gloo(cfg, arch, device: str, problems: List[str]) -> None:
    """megatron-core 0.16.1's alltoall dispatcher with EP > 1 and expert-TP > 1 all-gathers each expert-TP rank's
    token count, which differ, in one all_gather: gloo (CPU) needs equal sizes and fails mid-step."""
    par = cfg.parallel
    etp = par.etp if par.etp is not None else par.tp
    if (device == "cpu" and arch.is_moe and par.ep > 1 and etp > 1
            and cfg.model.moe_token_dispatcher == "alltoall"):
        problems.append(f"parallel.ep={par.ep} with expert tensor parallelism {etp} (parallel.etp, default "
                        "parallel.tp) on CPU: megatron-core's alltoall dispatcher gathers uneven token counts, "
                        "which gloo cannot; set parallel.etp=1 or model.moe_token_dispatcher=allgather")


def validate(cfg, world_size: Optional[int], te_available: bool = False, device: str = "cpu"):
    """Raise :class:`ConfigError` listing every problem; return the resolved architecture."""
    from megatron_swift.models.arch import resolve

    if OmegaConf.is_missing(cfg.model, "family"):
        raise ConfigError([f"no model chosen: add +model=<family>, one of: {', '.join(families.names())}"])
    try:
        arch = resolve(cfg.model)
    except KeyError as e:
        raise ConfigError([str(e.args[0])]) from None
    except (DataError, CompositionError) as e:
        raise ConfigError([str(e)]) from None
    problems: List[str] = []
    _layout(cfg, arch, te_available, problems)
    _batch(cfg, world_size, problems)
    _run(cfg, problems)
    _wandb(cfg, problems)
    _data(cfg, problems)
    _task(cfg, problems)
    _tuner(cfg, arch, problems)
    _vision(cfg, arch, problems)
    _new_tokens(cfg.model, problems)
    _backend(cfg, te_available, device, problems)
    _moe_on_gloo(cfg, arch, device, problems)
    if problems:
        raise ConfigError(problems)
    return arch


def precheck(cfg) -> None:
    """``validate`` as the run will call it, before megatron-core is imported (launch/train.py): a config
    problem is one line in a second or two instead of after the heavy imports. The device and Transformer
    Engine are found the way the backend finds them; the run validates again once it has them for real."""
    from megatron_swift.backend.device import resolve_device, te_available

    device = resolve_device(cfg.train.device)
    arch = validate(cfg, int(os.environ.get("WORLD_SIZE", "1")), te_available=device == "cuda" and te_available(),
                    device=device)
    par = cfg.parallel
    if arch.is_moe and par.tp > 1 and not par.sp and cfg.train.train_iters != 0:
        # megatron-core 0.16 (MoELayer.forward) raises in training mode; forward-only tools are not affected.
        raise ConfigError([f"parallel.tp={par.tp} on a MoE model needs parallel.sp=true to train (megatron-core "
                           "refuses MoE layers under tensor parallelism without sequence parallelism)"])
