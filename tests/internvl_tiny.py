"""Tiny random HF InternVL folders (``InternVLForConditionalGeneration``, transformers' native format) for the
tests: weights, config, a GotOcr2 image processor that tiles (crop_to_patches, thumbnail), an HF tokenizer
trained on the fly with InternVL's image tokens, and the processor settings. Also transformers' own
``InternVLProcessor`` over such a folder, the ground truth for token ids and pixels."""
from __future__ import annotations

import json
import os
from unittest import mock

import torch
import transformers

# <img> ... </img> around each image, <IMG_CONTEXT> at each of its feature positions (InternVL-hf's spelling).
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS.values()]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Two shapes that differ wherever InternVL can: tile side and patch (tokens per tile), norms, QK norm, layer
# scale, attention bias, language family, tied head, max tiles.
SHAPES = {
    "qwen2": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14, use_qk_norm=True, norm_type="layer_norm",
                              attention_bias=True, layer_scale_init_value=0.1),
                  text=("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=False)),
                  max_patches=6),
    "qwen3": dict(vision=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                              image_size=64, patch_size=8, use_qk_norm=False, norm_type="rms_norm",
                              attention_bias=False, layer_scale_init_value=0.5),
                  text=("Qwen3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            tie_word_embeddings=True)),
                  max_patches=4),
}
VOCAB = 320


def tokens_per_tile(shape: str, ratio: float = 0.5) -> int:
    v = SHAPES[shape]["vision"]
    return int((v["image_size"] // v["patch_size"]) ** 2 * ratio ** 2)


def tokenizer(folder) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (trained here) with InternVL's image tokens as named special tokens and a ChatML
    template, saved to ``folder``."""
    from tests.conftest import bpe_tokenizer

    tok = bpe_tokenizer(["What is in the picture? A temple, a flower and the sky.",
                         "system user assistant says hello; describe both images"], SPECIALS, 300)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", extra_special_tokens=IMAGE_TOKENS)
    fast.save_pretrained(str(folder))
    (folder / "chat_template.jinja").write_text(CHATML)
    return fast


def tiny_internvl(shape: str, folder):
    """A random tiny HF InternVL of ``shape`` (SHAPES; norms, biases and layer scales random too, so a skipped
    tensor shows) with its processor files, saved to ``folder``; returns the model (fp32, eval)."""
    spec = SHAPES[shape]
    folder.mkdir(parents=True, exist_ok=True)
    fast = tokenizer(folder)
    text_cls, text = spec["text"]
    text_config = getattr(transformers, text_cls)(vocab_size=VOCAB, max_position_embeddings=1024, **text)
    config = transformers.InternVLConfig(
        vision_config=transformers.InternVLVisionConfig(**spec["vision"]), text_config=text_config,
        image_token_id=fast.context_image_token_id, image_seq_length=tokens_per_tile(shape), downsample_ratio=0.5,
        tie_word_embeddings=text["tie_word_embeddings"])
    torch.manual_seed(0)
    model = transformers.InternVLForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "lambda" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.save_pretrained(folder)
    side = spec["vision"]["image_size"]
    transformers.GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=True, min_patches=1,
                                       max_patches=spec["max_patches"]).save_pretrained(str(folder))
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": tokens_per_tile(shape)}))
    return model


def hf_processor(folder) -> transformers.InternVLProcessor:
    """transformers' InternVLProcessor over the folder's tokenizer and (PIL) image processor. transformers 5
    refuses to build it without torchvision (for its video processor, which images never use), so the class
    check of the video slot is skipped here: everything the processor does with images is its own code."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    images = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    settings = json.loads((folder / "processor_config.json").read_text())
    with mock.patch.object(transformers.ProcessorMixin, "check_argument_for_proper_class", lambda *a: None):
        return transformers.InternVLProcessor(image_processor=images, tokenizer=tok, video_processor=None,
                                              image_seq_length=settings["image_seq_length"],
                                              chat_template=(folder / "chat_template.jinja").read_text())


def photos():
    """Two real photographs of different sizes (scikit-learn's JPEGs, both 640 x 427: the flower cut to a
    240 x 427 portrait) -> different tile counts."""
    import sklearn.datasets
    from PIL import Image

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    china, flower = (Image.open(os.path.join(folder, n)).convert("RGB") for n in ("china.jpg", "flower.jpg"))
    return [china, flower.crop((0, 0, 240, 427))]
