"""A LLaVA-style vision-language model on megatron-core: vision encoder -> MLP projector -> language model.

Our own thin module rather than megatron-core's ``LLaVAModel`` (0.16), with the same attribute names
(``vision_model``, ``vision_projection``, ``language_model``) so that the parameter names are LLaVAModel's.
LLaVAModel's forward does not fit (docs/design/vlm/README.md section 7.4): it wants one ``<image>`` token per
image and re-indexes labels and loss masks inside the model, it needs Transformer Engine for its
LayerNorm, SP and CP, and it always applies SigLIP's final norm. Here the token ids are HF's pre-expanded
ones: ``image_index`` (data/sampler.Batch) says which feature row goes to which position, so packing,
context parallelism and the task losses see an ordinary GPT batch.

The vision encoder and projector live on the first pipeline stage only (virtual stage 0).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megatron_swift.models.builder import build_gpt_chunks
from megatron_swift.models.vision import build_vision_model, vision_config

_PROJECTOR_ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                          "relu": F.relu, "silu": F.silu}


class VisionLanguageModel(MegatronModule):
    """One pipeline chunk of a VLM; behaves as its GPTModel for the training loop and schedules."""

    def __init__(self, language_model, vision_model=None, vision_projection=None, drop_class_token: bool = False):
        """``vision_projection`` None with a ``vision_model``: a tower that gives LM-width features itself
        (models/held_tower.HeldTower, called with the batch's family-specific ``media``)."""
        super().__init__(config=language_model.config)
        self.language_model = language_model
        self.vision_model = vision_model
        self.vision_projection = vision_projection
        self.drop_class_token = drop_class_token
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights
        self.model_type = language_model.model_type
        self.freeze_groups = {}  # train.freeze groups whose regex differs from tuners.FREEZE_GROUPS' (a held tower)
        self.deepstack = None  # models/deepstack.DeepStack of a tower that also feeds the first decoder layers

    # What megatron-core's schedules and finalize_model_grads ask a model chunk for.
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[n * T, hidden]: the projected features of n images, image after image."""
        # Float16Module casts positional inputs only: the pixels come as a keyword.
        features = self.vision_model(images.to(self.vision_model.conv1.weight.dtype))  # [n, tokens, h_vision]
        if self.drop_class_token:
            features = features[:, self.vision_model.class_token_len:]
        return self.vision_projection(features).reshape(-1, self.config.hidden_size)

    def media_features(self, images: Optional[torch.Tensor], media: Optional[dict]) -> Optional[torch.Tensor]:
        """[N, hidden] LM-width features of the micro-batch's images (None: it has none): LLaVA-style pixels
        through encoder and projector, or a held tower's own inputs (``media``: e.g. Qwen2.5-VL's flattened
        patches and ``image_grid_thw``) through the tower alone."""
        if media:
            return self.vision_model(**media)
        if images is not None and images.numel():
            return self.image_features(images)
        return None

    def forward(self, input_ids, position_ids, attention_mask=None, decoder_input=None, labels=None,
                images: Optional[torch.Tensor] = None, image_index: Optional[torch.Tensor] = None,
                media: Optional[dict] = None, **kwargs):
        """GPTModel's call with the micro-batch's ``images`` (or a held tower's ``media``) and their
        ``image_index`` ([b, s], -1: text). ``position_ids`` may be M-RoPE's [3, b, s] (the language model built
        with position_embedding_type='mrope')."""
        if position_ids is not None and position_ids.dim() == 2 and self.language_model.position_embedding_type == "mrope":
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)  # text only: one position in all three streams
        if self.pre_process and decoder_input is None:
            decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=None)
            features = self.media_features(images, media)
            if self.deepstack is not None:  # Qwen3-VL: per-layer features go to hooks (models/deepstack.py)
                features = self.deepstack.take(features, image_index)
            if features is not None:
                decoder_input = place_images(decoder_input, features, image_index)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, **kwargs)


def image_inputs(batch) -> dict:
    """The keyword arguments a batch with images adds to the model call (none for text: any model takes it)."""
    if batch.images is None and not batch.media:
        return {}
    if batch.media:
        return {"media": batch.media, "image_index": batch.image_index}
    return {"images": batch.images, "image_index": batch.image_index}


def place_images(embeddings: torch.Tensor, features: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """``embeddings`` [s, b, h] with feature row ``image_index[b, s]`` wherever that is >= 0 (differentiable
    in both; masked_scatter fills the masked positions in the order their feature rows are listed)."""
    index = image_index.t()  # [s, b], as the embeddings
    mask = index >= 0
    rows = features[index[mask]].to(embeddings.dtype)
    return embeddings.masked_scatter(mask.unsqueeze(-1), rows)


def projector_config(arch, tconfig: TransformerConfig, **common) -> TransformerConfig:
    """The projector's MLP: vision width -> language width -> language width, no gating."""
    if arch.projector_activation not in _PROJECTOR_ACTIVATIONS:
        raise ValueError(f"projector activation {arch.projector_activation!r} is not one of "
                         f"{sorted(_PROJECTOR_ACTIVATIONS)}")
    return TransformerConfig(num_layers=1, hidden_size=tconfig.hidden_size, ffn_hidden_size=tconfig.hidden_size,
                             num_attention_heads=tconfig.tensor_model_parallel_size,  # no attention; TP checks it
                             gated_linear_unit=False, add_bias_linear=arch.projector_bias,
                             activation_func=_PROJECTOR_ACTIVATIONS[arch.projector_activation],
                             bias_activation_fusion=False, gradient_accumulation_fusion=False, **common)


def _shared_settings(tconfig: TransformerConfig) -> dict:
    """What the vision encoder and projector take from the language model's config: precision, TP,
    initialisation. Never pipelined, no sequence or context parallelism."""
    return dict(params_dtype=tconfig.params_dtype, pipeline_dtype=tconfig.pipeline_dtype, bf16=tconfig.bf16,
                fp16=tconfig.fp16, use_cpu_initialization=tconfig.use_cpu_initialization,
                tensor_model_parallel_size=tconfig.tensor_model_parallel_size,
                init_method_std=tconfig.init_method_std, init_method=tconfig.init_method,
                output_layer_init_method=tconfig.output_layer_init_method)


def build_vlm_chunks(arch, tconfig: TransformerConfig, padded_vocab: int, seq_length: int, backend,
                     unfuse_norms: bool = False) -> List[VisionLanguageModel]:
    """This rank's chunks: the language model's GPTModel chunks, the first holding the encoder and projector."""
    chunks = []
    language = build_gpt_chunks(arch, tconfig, padded_vocab, seq_length, backend, unfuse_norms, scatter_sp=False)
    for vp_stage, lm in enumerate(language):
        vision = projection = None
        if vp_stage == 0 and ps.is_pipeline_first_stage(ignore_virtual=True):
            common = _shared_settings(tconfig)
            vision = build_vision_model(arch.vision, vision_config(arch.vision, **common), backend.attention)
            projection = MultimodalProjector(projector_config(arch, tconfig, **common),
                                             get_mlp_module_spec(use_te=False).submodules, "mlp",
                                             arch.vision.hidden_size)
            vision.to(backend.torch_device)
            projection.to(backend.torch_device)
        drop = arch.vision.class_token and arch.vision_select == "default"
        chunks.append(VisionLanguageModel(lm, vision, projection, drop_class_token=drop))
    return chunks


def build_held_vlm_chunks(arch, tconfig: TransformerConfig, padded_vocab: int, seq_length: int, backend,
                          tower, unfuse_norms: bool = False, freeze_groups: Optional[dict] = None
                          ) -> List[VisionLanguageModel]:
    """This rank's chunks for a VLM whose tower is held as the transformers module (models/held_tower.py):
    the language model's GPTModel chunks, the first stage's first holding ``tower()`` (which gives LM-width
    features itself: no vision_projection). ``freeze_groups``: the train.freeze regexes of its ``vision`` and
    ``projector`` groups (which of the tower's parameters are its projector)."""
    chunks = []
    language = build_gpt_chunks(arch, tconfig, padded_vocab, seq_length, backend, unfuse_norms, scatter_sp=False)
    for vp_stage, lm in enumerate(language):
        held = tower() if vp_stage == 0 and ps.is_pipeline_first_stage(ignore_virtual=True) else None
        chunk = VisionLanguageModel(lm, held, None)
        chunk.freeze_groups = dict(freeze_groups or {})
        chunks.append(chunk)
    return chunks


def add_image_token(arch, vocab: int, tokenizer, tag: str = "<image>"):
    """(arch, vocabulary size) with the image token a VLM needs: the checkpoint's, else the tokenizer's own
    ``tag`` token, else the id the tokenizer would give a new token (its size): a spare row of an embedding
    larger than the tokenizer (Qwen's), or one row more (as transformers' LLaVA conversions add the token)."""
    if not arch.has_vision or arch.image_token_id is not None:
        return arch, vocab
    ids = tokenizer.encode_with_offsets(tag)[0]
    token = ids[0] if len(ids) == 1 else tokenizer.vocab_size
    return dataclasses.replace(arch, image_token_id=token), max(vocab, token + 1)
