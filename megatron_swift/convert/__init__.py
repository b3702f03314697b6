"""Hugging Face <-> Megatron weights: declarative name tables, typed transforms, streaming safetensors I/O."""
