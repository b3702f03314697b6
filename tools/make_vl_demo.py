"""Make the bundled vision-language demo set, and the tiny models the "VL model from scratch" recipe composes.

Data (``--out``, default: the package's bundled copy): PIL-drawn shapes (circle, square, triangle) in one of four
colours at a random place and size on a light background, each with one question: its colour, its shape, or a
short caption. Rows are ``{"messages": [...], "images": ["images/train_00001.png"]}`` with paths relative to the
JSONL file. The same seed gives the same files.

Models (``--models DIR``): ``DIR/llm``, a tiny random Qwen2 causal LM with a word-level tokenizer over the demo's
words and a ChatML template; ``DIR/vision``, a tiny random CLIP vision encoder with its image processor. Nothing is
downloaded: these stand in for the HF folders (model.llm, model.vision) a real run starts from. ``DIR/qwen2_5_vl``: a
tiny random Qwen2.5-VL (our ``tiny`` size's shapes) with the same tokenizer plus Qwen's vision tokens and a Qwen2-VL
image processor, the stand-in for model.pretrained of a Qwen2.5-VL run.

usage: python tools/make_vl_demo.py --models DIR         (the tiny models only)
       python tools/make_vl_demo.py [--out DIR] [--train N] [--eval N]   (the data set)
"""
from __future__ import annotations

import argparse
import json
import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(ROOT, "megatron_swift", "assets", "vl_shapes")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What color is the shape?", "shape": "What shape is this?", "caption": "Describe the image."}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def draw(colour: str, shape: str, rng: random.Random, size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    pen, fill = ImageDraw.Draw(image), COLOURS[colour]
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def answer(kind: str, colour: str, shape: str) -> str:
    return {"colour": colour, "shape": shape, "caption": f"a {colour} {shape}"}[kind]


def write_split(out: str, split: str, count: int, rng: random.Random, size: int) -> None:
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        for i in range(count):
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
            kind = rng.choice(sorted(QUESTIONS))
            name = f"images/{split}_{i:05d}.png"
            draw(colour, shape, rng, size).save(os.path.join(out, name), optimize=True)
            row = {"messages": [{"role": "user", "content": "<image>" + QUESTIONS[kind]},
                                {"role": "assistant", "content": answer(kind, colour, shape)}],
                   "images": [name], "kind": kind}
            f.write(json.dumps(row) + "\n")


def _tokenizer(extra=()):
    """A word-level tokenizer over the demo's words with ChatML specials (and ``extra`` special tokens last)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = sorted({w for q in QUESTIONS.values() for w in q.replace("?", " ?").replace(".", " .").split()}
                   | set(COLOURS) | set(SHAPES) | {"a", "user", "assistant", "system", "<unk>"})
    vocab = {t: i for i, t in enumerate(specials + words + list(extra))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials + list(extra))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast, vocab


def write_models(folder: str, size: int) -> None:
    """A tiny random Qwen2 LLM (with tokenizer and chat template) and a tiny random CLIP vision encoder."""
    import torch
    import transformers

    fast, vocab = _tokenizer()
    torch.manual_seed(0)
    llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=vocab["<|im_end|>"], bos_token_id=None, pad_token_id=vocab["<|endoftext|>"]))
    llm.save_pretrained(os.path.join(folder, "llm"))
    fast.save_pretrained(os.path.join(folder, "llm"))
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=size,
        patch_size=8))
    vision.save_pretrained(os.path.join(folder, "vision"))
    transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                                    ).save_pretrained(os.path.join(folder, "vision"))


QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def write_qwen2_5_vl(folder: str, side: int = 112) -> None:
    """A tiny random Qwen2.5-VL (HF Qwen2_5_VLForConditionalGeneration) with the shapes of our ``tiny`` size (a
    2-layer decoder with M-RoPE sections [2, 3, 3], a 2-block windowed tower), the demo's word-level tokenizer
    with Qwen's vision tokens, and a Qwen2-VL image processor that resizes every image to ``side`` pixels
    (side / 28 squared image tokens)."""
    import torch
    import transformers

    fast, vocab = _tokenizer(QWEN_SPECIALS)
    start, end, image, video = (vocab[t] for t in QWEN_SPECIALS)
    text = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"], bos_token_id=None)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=image,
                                           video_token_id=video, vision_start_token_id=start,
                                           vision_end_token_id=end, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    transformers.Qwen2VLImageProcessor(min_pixels=side * side, max_pixels=side * side, patch_size=14,
                                       merge_size=2, temporal_patch_size=2).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for train.jsonl, eval.jsonl and images/ (default: the bundled "
                        "copy, rewritten, unless only --models is given)")
    parser.add_argument("--train", type=int, default=384, help="training rows")
    parser.add_argument("--eval", type=int, default=96, help="held-out rows")
    parser.add_argument("--size", type=int, default=56, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", help="also write the tiny llm/ and vision/ HF folders here")
    args = parser.parse_args()
    if args.out or not args.models:
        out, rng = args.out or BUNDLED, random.Random(args.seed)
        write_split(out, "train", args.train, rng, args.size)
        write_split(out, "eval", args.eval, rng, args.size)
        print(f"wrote {args.train} training and {args.eval} held-out rows to {out}")
    if args.models:
        write_models(args.models, args.size)
        write_qwen2_5_vl(os.path.join(args.models, "qwen2_5_vl"))
        print(f"wrote {args.models}/llm (tiny Qwen2), {args.models}/vision (tiny CLIP) and "
              f"{args.models}/qwen2_5_vl (tiny Qwen2.5-VL)")


if __name__ == "__main__":
    main()
