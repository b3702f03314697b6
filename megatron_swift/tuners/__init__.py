"""Parameter-efficient fine-tuning and freezing: LoRA adapters (lora.py), which parameters train
(freeze.py), global parameter names (names.py); apply.apply_tuner puts them on a model."""

# train.freeze groups -> the regex (re.search on global Megatron names) each stands for.
FREEZE_GROUPS = {
    "embedding": r"^(language_model\.)?embedding\.",
    "output_layer": r"^(language_model\.)?output_layer\.",
    "attention": r"\.self_attention\.",
    "mlp": r"\.mlp\.",
    "router": r"\.mlp\.router\.",
    "experts": r"\.mlp\.experts\.",
    "shared_experts": r"\.mlp\.shared_experts\.",  # MoE families' shared experts (and their gate)
    "norms": r"(layernorm|_norm)\.weight$|layer_norm_weight$",
    # Vision-language models (models/vlm.py): the encoder, the projector, the language model.
    "vision": r"^vision_model\.",
    "projector": r"^vision_projection\.",
    "llm": r"^language_model\.",
}
# Megatron linears that tuner.target_modules may name (all-linear: every one of them).
# Multi-head latent attention (families/deepseek.py) has its query (direct, or down then up) and key/value (down,
# then up) projections instead of linear_qkv.
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "linear_q_proj", "linear_q_down_proj",
                "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")
