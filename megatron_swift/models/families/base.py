"""What a model family declares: fixed architecture traits plus a table of named sizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from megatron_swift.models.rope import RopeScaling


class CompositionError(ValueError):
    """A model put together from several HF folders (model.llm + model.vision) that cannot be: the message
    names the key to change (config.validate turns it into one config line)."""


@dataclass(frozen=True)
class Size:
    """One published (or test) configuration of a family."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: Optional[int] = None
    vocab_size: Optional[int] = None  # None: take the tokenizer's
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    untie_embeddings: bool = True
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: Optional[int] = None
    # False: softmax over the top-k logits, i.e. top-k weights that sum to 1 (HF norm_topk_prob=True);
    # True: top-k of a softmax over all experts, not renormalised (norm_topk_prob=False).
    moe_router_pre_softmax: bool = False
    rotary_percent: float = 1.0  # rotated fraction of each head (HF partial_rotary_factor)
    rope_scaling: Optional[RopeScaling] = None  # HF rope_scaling (models/rope.py); None: default RoPE
    # Attention traits that vary between checkpoints of one family (GLM-4.5's attention_bias, use_qk_norm);
    # None: the family's own trait (Family.add_qkv_bias / qk_layernorm).
    qkv_bias: Optional[bool] = None
    qk_norm: Optional[bool] = None
    # MoE axes beyond routed experts (defaults: every layer routed, softmax router, no shared expert).
    moe_shared_ffn_hidden_size: Optional[int] = None  # width of the shared expert(s) together; None: none
    moe_shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(x . w) (Qwen2-MoE)
    moe_score_function: str = "softmax"  # router scores: softmax or sigmoid (GLM-4.5, DeepSeek-V3)
    moe_expert_bias: bool = False  # a per-expert bias added to the scores for selection only (HF e_score_correction_bias)
    moe_topk_scaling_factor: Optional[float] = None  # routed weights times this (HF routed_scaling_factor)
    moe_num_groups: Optional[int] = None  # experts in groups, top groups chosen first (HF n_group; None: no groups)
    moe_group_topk: Optional[int] = None  # groups chosen per token (HF topk_group)
    moe_dense_first: int = 0  # the first k layers have a dense MLP (HF first_k_dense_replace)
    moe_sparse_step: int = 1  # layer i routes when (i + 1) % step == 0 (HF decoder_sparse_step)
    moe_dense_layers: Tuple[int, ...] = ()  # more layers with a dense MLP (HF mlp_only_layers)
    # Numbers only this family's architecture has, as a plain dict its module documents (families/deepseek.py:
    # MLA ranks and head dims, routing); None for families without.
    family_options: Optional[dict] = None
    # Multi-token-prediction layers after the decoder (megatron-core MultiTokenPredictionBlock; HF
    # num_nextn_predict_layers); 0: none.
    mtp_num_layers: int = 0


def moe_layer_pattern(arch) -> list:
    """Per layer, 1 for a routed-experts MLP and 0 for a dense one (megatron-core's moe_layer_freq list), from
    an Arch's or Size's MoE layout fields; every layer 1 when nothing makes a layer dense."""
    dense = set(arch.moe_dense_layers or ())
    return [int(i >= arch.moe_dense_first and (i + 1) % arch.moe_sparse_step == 0 and i not in dense)
            for i in range(arch.num_layers)]


@dataclass(frozen=True)
class Family:
    """Architecture traits shared by every size of a family."""

    name: str
    hf_architectures: Tuple[str, ...]  # the first one is written on export
    hf_model_type: str
    sizes: Dict[str, Size]
    qk_layernorm: bool = False
    add_qkv_bias: bool = False
    moe: bool = False
    # weights(tied=...) -> the HF <-> Megatron weight table (convert.tables); None: not convertible yet.
    weights: Optional[Callable[..., list]] = None
    hf_head: str = "lm_head.weight"  # the HF name of the LM head (read to tell LMs from reward models)
    # HF config keys of this family beyond a dense causal LM's (MoE layout, router, optional attention traits):
    # hf_read(hf, where) -> Size fields (``where``: config.json's path, for errors); hf_write(arch record) ->
    # the HF keys back. Both live in the family's file.
    hf_read: Optional[Callable[[dict, str], dict]] = None
    hf_write: Optional[Callable[[dict], dict]] = None
    layers_prefix: str = "decoder.layers."  # Megatron names of the pipelined (language) decoder layers
    # Where a layer's norms sit: "pre" (before attention and MLP) or "post" (on their outputs, before the residual
    # add: OLMo 2; models/post_norm.py).
    norm_placement: str = "pre"
    # QK norm over a token's whole query / key projection, all heads together (OLMo 2), instead of per head.
    qk_norm_whole: bool = False

    # What a family may override (families/llava.py does): how its HF config reads and writes, how its
    # module is built, its weight table, and which HF tensors it reads under which names.
    def read_hf(self, hf: dict, folder: str) -> dict:
        """Architecture fields (models.arch.Arch) from an HF config.json."""
        import os

        from megatron_swift.convert.hf_config import arch_fields

        fields = arch_fields(hf, folder)
        if self.hf_read is not None:
            fields.update(self.hf_read(hf, os.path.join(folder, "config.json")))
        return fields

    def compose(self, model_cfg) -> dict:
        """Architecture fields of a model put together from several HF folders (model.llm + model.vision)."""
        raise CompositionError(f"model.llm / model.vision compose a vision-language model; +model={self.name} is not "
                         "one (use +model=llava)")

    def write_hf(self, arch: dict, dtype: str) -> dict:
        """An HF config.json from stored architecture numbers (Arch.plain())."""
        from megatron_swift.convert.hf_config import to_hf_config

        config = to_hf_config(self, arch, dtype)
        if self.hf_write is not None:
            config.update(self.hf_write(arch))
        return config

    def hf_fill(self, arch) -> dict:
        """HF tensors an export without a source folder adds so that transformers finds no weight missing
        (name -> tensor; ones the model does not use, such as a VLM tower's final norm)."""
        return {}

    def export_assets(self, folder: str, model_cfg, arch: dict) -> None:
        """Files besides config and weights an HF export needs when there is no source folder to copy them from
        (a model composed of several folders)."""

    def build(self, arch, tconfig, padded_vocab: int, seq_length: int, backend, unfuse_norms: bool = False) -> list:
        """This rank's model chunks (one per virtual pipeline stage)."""
        from megatron_swift.models.builder import build_gpt_chunks

        return build_gpt_chunks(arch, tconfig, padded_vocab, seq_length, backend, unfuse_norms)

    def transformer_fields(self, arch) -> dict:
        """Extra megatron-core TransformerConfig fields of this architecture (``multi_latent_attention=True``
        makes it an MLATransformerConfig)."""
        return {}

    def layout_problems(self, arch, parallel) -> list:
        """What this architecture cannot do under a layout (``parallel``: its tp, pp, cp, ep, as the run's
        parallel config or a planner Layout has them): one line each, naming the key to change (config.validate
        lists them; the planner skips such layouts)."""
        return []

    def mtp_layers_supported(self, arch) -> int:
        """How many multi-token-prediction layers this architecture can build (model.mtp_num_layers at most)."""
        return 0

    def layer_macs(self, arch, seq_length: int) -> Optional[float]:
        """Forward multiply-accumulates per token of all decoder layers (training.flops), or None for the
        formula of GQA attention and (MoE) SwiGLU MLPs there."""
        return None

    def layer_params(self, arch, layout, index: int) -> Optional[Dict[str, int]]:
        """Parameters of decoder layer ``index`` on one rank, {"dense": n, "expert": n} (plan.memory), or None
        for the count of a GQA attention and (MoE) SwiGLU MLP layer there."""
        return None

    def rules(self, arch) -> list:
        """The HF <-> Megatron weight table of this architecture."""
        traits = {k: v for k, v in (("qkv_bias", arch.qkv_bias), ("qk_norm", arch.qk_norm)) if v is not None}
        return self.weights(tied=not arch.untie_embeddings, head=arch.head, **traits)

    def context(self, name: str, arch, dense):
        """The convert.hf_load.Context of Megatron parameter ``name`` (``dense``: the language model's)."""
        return dense

    def vision_data(self, cfg, arch):
        """data.images.VisionData of a VLM whose tower is held as the transformers module (Arch.vision_hf)."""
        raise NotImplementedError(f"+model={self.name} has no image data")

    def tower_params(self, arch) -> Dict[str, int]:
        """Parameters of a held tower (Arch.vision_hf), whole on each first-stage rank: {"encoder", "projector"}."""
        return {"encoder": 0, "projector": 0}

    def tower_image_grid(self, arch, max_pixels: Optional[int], max_tokens: Optional[int] = None):
        """The (t, h, w) patch grid of the largest image a held tower (Arch.vision_hf) gets under data.max_pixels
        and of at most ``max_tokens`` image tokens (the planner's worst case); None: not counted."""
        return None

    def tower_image_tokens(self, arch, grid) -> int:
        """Language-model tokens of one image of a held tower with ``grid`` (as tower_image_grid gives it)."""
        return 0

    def tower_activation_bytes(self, arch, grids, train_tower: bool, train_merger: bool, eager: bool,
                               dtype_bytes: int) -> int:
        """Bytes autograd keeps through a held tower for one micro-batch's images (``grids``: (t, h, w) patch
        grids); ``eager``: transformers' eager attention (model.attention_backend=local), else SDPA."""
        return 0

    def tower_flops_per_token(self, arch, train_vision: bool, image_tokens: Optional[int] = None) -> float:
        """Training FLOPs of a held tower (Arch.vision_hf) per image token the language model receives, for an
        image of ``image_tokens`` tokens (None: not known; the family's lower bound)."""
        return 0.0

    def check_inputs(self, folder: str, hf: dict, images: list, seq: int, generator) -> dict:
        """tools/convert/check.py --image: one row of random text around ``images`` (PIL images, through the
        folder's own processor) as transformers' model takes it ("hf": its forward's keyword arguments) and as
        ours does ("megatron": tokens, position_ids, image_index and the model's media keywords)."""
        raise NotImplementedError(f"--image: +model={self.name} has no image check yet (qwen2_5_vl has)")

    def canonical_hf_name(self, name: str) -> str:
        """One spelling for an on-disk HF tensor name (checkpoints of different transformers releases differ)."""
        return name

    def hf_unused(self, arch, name: str) -> bool:
        """Whether HF tensor ``name`` (canonical) is one this model does not use, by design."""
        return False

    @property
    def hf_reward_architecture(self) -> str:
        """The HF class of this family's reward models (sequence classification, one label)."""
        return self.hf_architectures[0].replace("ForCausalLM", "ForSequenceClassification")

    def size(self, name: str) -> Size:
        if name not in self.sizes:
            raise KeyError(
                f"model.size={name} is not a size of family {self.name}; choose one of: {', '.join(self.sizes)}"
            )
        return self.sizes[name]
