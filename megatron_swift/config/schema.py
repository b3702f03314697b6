"""Typed configuration: one dataclass per Hydra group, registered in the ConfigStore.

Every field carries a one-line docstring (a test checks this).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from megatron_swift.tasks.configs import SCHEMAS as TASK_SCHEMAS
from megatron_swift.tasks.configs import TaskConfig


@dataclass
class ModelConfig:
    """Which model to build; architecture fields left at None come from the family's size table."""

    family: str = MISSING
    """Model family, chosen with +model=<family> (llama, qwen2, qwen3, qwen3_moe, mixtral, qwen2_moe, glm4_moe, deepseek, mimo, olmo2, phi3, llava)."""
    size: str = "tiny"
    """Named size in the family's table (tiny for CPU, or a published size such as 8b)."""
    pretrained: Optional[str] = None
    """HF checkpoint folder: architecture from its config.json, weights streamed from its safetensors (replaces size)."""
    num_layers: Optional[int] = None
    """Number of transformer layers (None: from the size table)."""
    hidden_size: Optional[int] = None
    """Hidden width (None: from the size table)."""
    ffn_hidden_size: Optional[int] = None
    """Dense MLP width (None: from the size table)."""
    num_attention_heads: Optional[int] = None
    """Number of query heads (None: from the size table)."""
    num_query_groups: Optional[int] = None
    """Number of key/value heads for GQA (None: from the size table)."""
    kv_channels: Optional[int] = None
    """Per-head dimension (None: from the size table, else hidden/heads)."""
    vocab_size: Optional[int] = None
    """Vocabulary size before padding (None: from the size table, else the tokenizer)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times parallel.tp."""
    max_position_embeddings: Optional[int] = None
    """Longest sequence the position embedding is set up for (None: from the size table)."""
    rotary_base: Optional[float] = None
    """RoPE base theta (None: from the size table)."""
    norm_epsilon: Optional[float] = None
    """Epsilon of the RMSNorm layers (None: from the size table)."""
    untie_embeddings: Optional[bool] = None
    """Separate output layer instead of reusing the input embedding (None: from the size table)."""
    num_experts: Optional[int] = None
    """Number of routed experts for MoE families (None: from the size table)."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of each expert's MLP (None: from the size table)."""
    moe_router_topk: Optional[int] = None
    """Experts chosen per token (None: from the size table)."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing auxiliary loss (0 disables it)."""
    moe_expert_bias_update_rate: float = 0.0
    """Aux-loss-free balancing (routers with an expert bias, DeepSeek-V3): per-step bias update rate; 0 keeps it."""
    mtp_num_layers: Optional[int] = None
    """Multi-token-prediction layers to build and train (None: as many as the checkpoint / size has; 0 drops them)."""
    mtp_loss_weight: float = 0.1
    """Weight of the multi-token-prediction loss (the mean over MTP layers) added to the main loss."""
    moe_token_dispatcher: str = "alltoall"
    """MoE token dispatcher: alltoall or allgather."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP blocks."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    attention_backend: str = "auto"
    """Core attention: auto (te when Transformer Engine imports, else sdpa), te, sdpa (PyTorch fused kernels) or local (megatron-core's explicit s x s, the reference)."""
    init_method_std: float = 0.02
    """Standard deviation of the random weight initialisation."""
    load: Optional[str] = None
    """Megatron checkpoint (run dir, checkpoints dir or iter_N dir) to take initial weights from; optimizer state is not loaded."""
    llm: Optional[str] = None
    """VLMs (+model=llava): an HF causal-LM folder for the language model, composed with model.vision (the projector starts fresh)."""
    vision: Optional[str] = None
    """VLMs (+model=llava): an HF CLIP or SigLIP folder for the vision encoder, composed with model.llm."""
    vision_feature_layer: Optional[int] = None
    """VLMs: the encoder layer whose output is the image features (HF vision_feature_layer; None: the checkpoint's, else -2)."""
    vision_select: Optional[str] = None
    """VLMs: default (drop CLIP's class token) or full (keep every feature); None: the checkpoint's, else default."""
    new_tokens: List[str] = field(default_factory=list)
    """Tokens to add to the tokenizer as special, never-split tokens (e.g. ['<tool_call>','</tool_call>']); the embedding and output layer grow to hold them."""
    new_token_init: str = "mean"
    """Initial rows of the new tokens: mean (of the existing rows), text (mean of model.new_token_init_text's tokens), or an init strategy name."""
    new_token_init_text: List[str] = field(default_factory=list)
    """With model.new_token_init=text: one text per new token whose tokens' mean row starts it (e.g. ['tool call','end tool call'])."""
    init_strategy: Optional[str] = None
    """Init of every parameter not loaded from model.pretrained/model.load: normal, zero, uniform, xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal, orthogonal (None: megatron-core's default)."""


@dataclass
class ParallelConfig:
    """How the model and data are split over ranks; world = tp * pp * cp * dp."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); None or 1 disables."""
    sp: bool = False
    """Sequence parallelism for norms and dropout (needs tp > 1)."""
    cp: int = 1
    """Context-parallel size: each rank of a CP group holds seq_length/cp tokens of every row (load-balanced)."""
    cp_comm: str = "a2a"
    """CP exchange for attention: a2a (Ulysses: any attention backend, heads/tp divisible by cp); TE only: p2p (ring), a2a+p2p, allgather."""
    ep: int = 1
    """Expert-parallel size for MoE models."""
    etp: Optional[int] = None
    """Expert tensor-parallel size (None: same as tp)."""
    distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the gradient reduce-scatter/all-reduce with backward."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with forward."""


@dataclass
class DataConfig:
    """Where training samples come from and how text becomes tokens."""

    source: str = "jsonl"
    """Data source: jsonl (text rows), sft (conversations), vl_sft (conversations with images, for a vision-language model), indexed (megatron .bin/.idx prefixes) or mock (random tokens)."""
    path: List[str] = field(default_factory=list)
    """Files (jsonl, sft, vl_sft: a row's "images" are paths relative to its file's folder) or path prefixes without .bin/.idx (indexed)."""
    weights: List[float] = field(default_factory=list)
    """Blend weights, one per data.path entry (indexed: megatron-core's blend; sft, vl_sft: sampling share); empty: by size."""
    text_key: str = "text"
    """Key of the text field in each JSONL row."""
    tokenizer: Optional[str] = None
    """Tokenizer: byte (built in), an HF tokenizer folder/tokenizer.json, a SentencePiece .model; None: model.pretrained's, else byte."""
    mock_samples: int = 256
    """Number of samples in the mock source."""
    shuffle: bool = True
    """Shuffle samples each epoch (seeded by train.seed and the epoch)."""
    eval_path: List[str] = field(default_factory=list)
    """Held-out files for evaluation (same source kind); empty disables evaluation."""
    format: str = "auto"
    """SFT row shape: auto (by keys), messages, sharegpt (conversations/from/value) or alpaca (instruction/input/output)."""
    template: Optional[str] = None
    """SFT chat template: chatml, llama3, plain, a .jinja file; None: the tokenizer folder's own."""
    loss_on: str = "assistant"
    """SFT tokens that carry loss: assistant (every assistant turn), last_assistant, or all."""
    packing: bool = False
    """Pack several SFT samples into each row of train.seq_length (best-fit decreasing), each attending only to itself."""
    min_pixels: Optional[int] = None
    """vl_sft with a native-resolution VLM (+model=qwen2_5_vl): the fewest pixels an image is resized to (the image processor's min_pixels; InternVL: min tiles = min_pixels // tile area); None: the processor's own."""
    max_pixels: Optional[int] = None
    """vl_sft with a native-resolution VLM: the most pixels an image is resized to (its max_pixels; fewer pixels, fewer image tokens; InternVL: max tiles = max_pixels // tile area, plus the thumbnail); None: the processor's own."""
    video_fps: float = 2.0
    """vl_sft videos (+model=qwen2_5_vl): frames sampled per second of a video file (transformers' Qwen2-VL sample_frames rule); a list of frame files is taken as this many frames per second."""
    video_max_frames: Optional[int] = None
    """vl_sft videos: the most frames sampled from a video file; None: the model folder's video processor's max_frames (transformers' default 768)."""
    video_min_pixels: Optional[int] = None
    """vl_sft videos: the fewest pixels each frame is resized to; None: the folder's video processor's (transformers' Qwen2-VL default 100352)."""
    video_max_pixels: Optional[int] = None
    """vl_sft videos: the most pixels each frame is resized to (fewer pixels, fewer video tokens); None: the folder's video processor's (default 602112)."""
    truncation: str = "error"
    """SFT samples longer than train.seq_length: error, truncate (keep the start; vl_sft: drop a row the cut would split an image of) or drop."""
    streaming: bool = False
    """Read SFT files lazily (no up-front pass): each DP rank takes every dp-th line through a shuffle buffer; needs train.train_iters."""
    stream_buffer: int = 10000
    """Lines held in each rank's shuffle buffer when streaming."""
    pack_window: int = 1000
    """Samples packed together at a time when streaming with data.packing."""
    on_error: str = "error"
    """Bad rows (invalid JSON or UTF-8, missing roles, empty assistant turn, over-long lines, missing or unreadable images): error (name file and line) or skip (count them)."""
    max_line_bytes: int = 16777216
    """Longest JSONL line accepted, in bytes (16 MiB); a longer line is rejected without reading it whole into memory."""


@dataclass
class TrainConfig:
    """Batching, optimisation, run length, precision and checkpointing."""

    micro_batch_size: int = 2
    """Samples per micro-batch on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step across all data-parallel ranks."""
    seq_length: int = 128
    """Tokens per sample."""
    lr: float = 3.0e-4
    """Peak learning rate."""
    min_lr: float = 3.0e-5
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warmup steps from 0 to lr."""
    lr_decay_style: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    lr_decay_iters: Optional[int] = None
    """Steps over which lr decays (None: the whole run)."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1.0e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    precision: str = "auto"
    """Compute precision: auto (bf16 on CUDA, fp32 on CPU), bf16, fp16 (dynamic loss scaling) or fp32."""
    fp8: Optional[str] = None
    """FP8 format through Transformer Engine: e4m3 or hybrid (None disables)."""
    recompute: str = "none"
    """Activation recompute: none, selective (core attention) or full."""
    recompute_num_layers: int = 1
    """Layers per recompute chunk when recompute=full."""
    seed: int = 1234
    """Seed for weights, dropout and data order."""
    max_epochs: Optional[int] = None
    """Stop after this many passes over the training samples (None: no epoch limit)."""
    train_iters: Optional[int] = None
    """Stop after this many optimizer steps (None: no step limit); the run stops at whichever limit comes first."""
    eval_interval: int = 0
    """Evaluate every this many steps (0 disables)."""
    eval_iters: int = 4
    """Global batches per evaluation."""
    save_interval: int = 0
    """Save a checkpoint every this many steps (0: only at the end and at epoch ends when asked)."""
    save_at_epoch_end: bool = True
    """Save a checkpoint when an epoch ends."""
    save_at_end: bool = True
    """Save a checkpoint when training stops."""
    save_hf: bool = False
    """After training, also write the final weights as an HF folder at <output_dir>/hf/iter_N."""
    keep_last: int = 2
    """Keep this many most recent checkpoints (0 keeps all); the newest checkpoint that verified intact is never pruned."""
    verify_checkpoints: bool = True
    """Check every file of a checkpoint against the checksums saved with it before resuming (falls back to an older intact one)."""
    resume: str = "auto"
    """auto: continue the run in output_dir (default output_dir: the latest unfinished run with the same settings); none: start fresh (refuses a dir that has checkpoints); or a checkpoint path."""
    output_dir: Optional[str] = None
    """Run directory for checkpoints and logs (None: outputs/<model>-<task>-<data>/<start time>, a new folder per run)."""
    max_skipped_steps: int = 3
    """Stop the run (exit 3) after this many consecutive steps skipped for a non-finite loss or gradient norm, or a loss spike."""
    loss_spike_factor: Optional[float] = None
    """Skip a step whose loss exceeds this factor times the mean of the last train.loss_spike_window good steps (None disables)."""
    loss_spike_window: int = 20
    """Good steps averaged for the loss-spike test (the test starts once this many have been seen)."""
    exit_duration_minutes: Optional[float] = None
    """Stop cleanly (save, exit 0) once the run has trained this many minutes since it started or resumed (None: no limit)."""
    device: str = "auto"
    """auto (CUDA if available), cuda or cpu."""
    freeze: List[str] = field(default_factory=list)
    """Parameter groups to freeze: embedding, output_layer, attention, mlp, router, experts, shared_experts, norms; VLMs also vision, projector, llm."""
    train_vision: bool = False
    """VLMs: train the vision encoder too (frozen by default, as the peers do; train.freeze=[vision] is then implied)."""
    freeze_regex: Optional[str] = None
    """Freeze the parameters whose Megatron name (global layer numbers) matches this regex."""
    trainable_regex: Optional[str] = None
    """Train the parameters matching this regex even if frozen by freeze, freeze_regex or a tuner (applied last)."""
    vision_lr: Optional[float] = None
    """VLMs: peak learning rate of the vision tower (train.freeze group vision; needs train.train_vision=true); None: train.lr. Warmup and decay scale it with train.lr."""
    projector_lr: Optional[float] = None
    """VLMs: peak learning rate of the projector (train.freeze group projector); None: train.lr. Warmup and decay scale it with train.lr."""


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    project: Optional[str] = None
    """WandB project; None disables WandB."""
    name: Optional[str] = None
    """Run name (None: the run directory's name)."""
    tags: List[str] = field(default_factory=list)
    """Run tags."""
    mode: str = "online"
    """online, offline or disabled."""


@dataclass
class LoggingConfig:
    """Console progress, metrics file, TensorBoard and WandB."""

    log_interval: int = 1
    """Print and log every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard events under <output_dir>/tensorboard."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases settings."""


@dataclass
class ClusterConfig:
    """Where the ranks run: this node under torchrun (local), or a SLURM job written by launch/slurm.py."""

    name: str = "local"
    """Cluster kind: local (torchrun on this node) or slurm (launch/slurm.py writes and submits an sbatch script)."""
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 8
    """Devices per node (used for planning and launch scripts)."""
    dist_timeout_minutes: int = 30
    """Timeout of collective operations before a hang is reported."""
    partition: Optional[str] = None
    """SLURM partition (None: the cluster's default)."""
    account: Optional[str] = None
    """SLURM account to charge (None: the user's default)."""
    time: str = "24:00:00"
    """SLURM time limit of one job (a requeued job gets it again)."""
    image: Optional[str] = None
    """Container image for pyxis/enroot (srun --container-image); None runs on the nodes' own Python."""
    container_mounts: List[str] = field(default_factory=list)
    """host:container paths to mount (srun --container-mounts); the run directory must be on shared storage."""
    workdir: Optional[str] = None
    """The project's directory as the nodes see it (None: this checkout; in a container, where it is mounted)."""
    job_name: Optional[str] = None
    """SLURM job name (None: megatron-swift-<family>-<size>)."""
    master_port: int = 29500
    """Port of the c10d rendezvous on the first node."""
    requeue: bool = True
    """Requeue the job when SLURM signals preemption or the time limit; it resumes from the latest checkpoint."""
    signal_seconds: int = 120
    """How long before the end SLURM signals the job (sbatch --signal=B:USR1@seconds)."""
    sbatch_extra: List[str] = field(default_factory=list)
    """More #SBATCH options, e.g. ['--exclusive', '--mem=0']."""
    dry_run: bool = False
    """Write the sbatch script but do not submit it."""
    gpu: str = "h100-80gb"
    """Accelerator kind for tools/plan.py (h100-80gb, h200-141gb, a100-80gb)."""
    gpus: Optional[int] = None
    """Total devices for tools/plan.py (None: nodes x gpus_per_node)."""


@dataclass
class TunerConfig:
    """Parameter-efficient fine-tuning: none (train every parameter) or LoRA adapters on Megatron linears."""

    name: str = "none"
    """none or lora."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """LoRA alpha: the adapter's output is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    """Linears that get adapters: linear_qkv, linear_proj, linear_fc1, linear_fc2, or all-linear."""
    target_regex: Optional[str] = None
    """Instead of target_modules: adapt every linear whose Megatron module name matches this regex."""
    modules_to_save: List[str] = field(default_factory=list)
    """Modules trained in full next to the adapters (e.g. output_layer, embedding)."""
    export: str = "merged"
    """What train.save_hf and mcore_to_hf write: merged (a plain HF model) or adapter (a PEFT adapter folder)."""


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model family, size and overrides."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and run length."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging sinks."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Cluster description."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """Training objective: task=<name> picks its schema (megatron_swift/tasks/configs.py)."""
    tuner: TunerConfig = field(default_factory=TunerConfig)
    """Parameter-efficient fine-tuning."""


def asset_path(name: str) -> str:
    """Absolute path of a file bundled in megatron_swift/assets (the ``${asset:...}`` resolver)."""
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", name)


def register() -> None:
    """Register the schemas so YAML in conf/ is type-checked against them."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in (("model", ModelConfig), ("parallel", ParallelConfig), ("data", DataConfig),
                        ("train", TrainConfig), ("logging", LoggingConfig), ("cluster", ClusterConfig),
                        ("tuner", TunerConfig)):
        cs.store(group=group, name=f"base_{group}", node=node)
    for name, node in TASK_SCHEMAS.items():  # each task its own schema
        cs.store(group="task", name=f"base_task_{name}", node=node)
