"""The non-weight files of an HF LLaVA folder exported from a VLM composed of an HF LLM and an HF vision encoder.

transformers' ``LlavaProcessor.from_pretrained`` needs the tokenizer (with ``<image>`` as one token, at the id the
model's embedding uses for it), the encoder's image processor config, and the processor's own settings (how many
tokens an image becomes). Written with ``tokenizers`` and JSON only: transformers is not a dependency.
"""
from __future__ import annotations

import json
import os
import shutil

from megatron_swift.models.vision_arch import VisionArch

IMAGE_TOKEN = "<image>"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                    "chat_template.json")


def write_vlm_assets(folder: str, llm: str, vision: str, arch: VisionArch, image_token_id: int, select: str) -> None:
    for name in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(llm, name)):
            shutil.copy2(os.path.join(llm, name), os.path.join(folder, name))
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        add_image_token(folder, image_token_id)
    if vision and os.path.isfile(os.path.join(vision, "preprocessor_config.json")):
        shutil.copy2(os.path.join(vision, "preprocessor_config.json"), os.path.join(folder, "preprocessor_config.json"))
    # LlavaProcessor: (image/patch)^2 + num_additional_image_tokens tokens, minus one with the default strategy.
    settings = dict(processor_class="LlavaProcessor", image_token=IMAGE_TOKEN, patch_size=arch.patch_size,
                    vision_feature_select_strategy=select, num_additional_image_tokens=int(arch.class_token))
    with open(os.path.join(folder, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=2)


def add_image_token(folder: str, image_token_id: int) -> None:
    """``<image>`` as a special token of the folder's tokenizer.json, which must give it ``image_token_id``."""
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.token_to_id(IMAGE_TOKEN) is None:
        tokenizer.add_special_tokens([IMAGE_TOKEN])
    got = tokenizer.token_to_id(IMAGE_TOKEN)
    if got != image_token_id:
        raise ValueError(f"{path}: the tokenizer gives {IMAGE_TOKEN} id {got}, the model uses {image_token_id}")
    tokenizer.save(path)
