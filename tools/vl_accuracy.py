"""Held-out answer accuracy of an exported HF VLM folder (LLaVA, Qwen2.5-VL) on vision-language rows, by transformers
itself.

Each row's last assistant turn is the answer; the model answers the turns before it (with their images) by greedy
generation through the folder's processor (``LlavaProcessor``; Qwen2.5-VL: its image processor and tokenizer) and
``AutoModelForImageTextToText``, and the answer counts when it equals the reference (case and surrounding space
ignored). Rows with a "kind" column (the demo set: colour, shape,
caption) are also counted per kind, next to the accuracy of guessing (the most common answer of that kind).

usage: python tools/vl_accuracy.py --hf RUN_OR_HF_FOLDER [--data megatron_swift/assets/vl_shapes/eval.jsonl]
"""
from __future__ import annotations

import argparse
import collections
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "megatron_swift", "assets", "vl_shapes", "eval.jsonl")


def hf_folder(path: str) -> str:
    """An exported HF folder as given, or a run folder's newest export (train.save_hf=true: <run>/hf/iter_N)."""
    exports = os.path.join(path, "hf")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(exports):
        found = sorted(n for n in os.listdir(exports) if n.startswith("iter_"))
        if found:
            return os.path.join(exports, found[-1])
    return path


def read_rows(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def llava_inputs(hf: str):
    """Row prompt + images -> model inputs by the folder's own processor (LlavaProcessor expands each <image>)."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(hf)
    return processor.tokenizer, lambda prompt, images: processor(images=images or None, text=prompt,
                                                                 return_tensors="pt")


def native_inputs(hf: str, config):
    """The same for a native-resolution model (Qwen2.5-VL): its image processor gives pixels and grids, and each
    <image> becomes <|vision_start|>, grid / merge^2 image tokens, <|vision_end|>, as its processor writes them
    (transformers' Qwen2_5_VLProcessor itself also builds a video processor, which needs torchvision)."""
    import transformers

    images_of = transformers.AutoImageProcessor.from_pretrained(hf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
    start, pad, end = tokenizer.convert_ids_to_tokens([config.vision_start_token_id, config.image_token_id,
                                                       config.vision_end_token_id])

    def build(prompt: str, images: list) -> dict:
        out = dict(images_of(images=images, return_tensors="pt")) if images else {}
        counts = (out["image_grid_thw"].prod(-1) // images_of.merge_size ** 2).tolist() if images else []
        parts = prompt.split("<image>")
        text = parts[0] + "".join(start + pad * n + end + rest for n, rest in zip(counts, parts[1:]))
        ids = tokenizer(text, return_tensors="pt")
        return dict(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], **out)

    return tokenizer, build


def answer(model, tokenizer, build, row: dict, folder: str, max_new_tokens: int) -> str:
    import torch
    from PIL import Image

    prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    images = [Image.open(os.path.join(folder, name)).convert("RGB") for name in row.get("images", [])]
    inputs = build(prompt, images)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def accuracy(hf: str, data: str, max_new_tokens: int = 8) -> dict:
    """{"overall": (right, total), kind: (right, total), "chance/<kind>": fraction} over the rows of ``data``."""
    import transformers

    model = transformers.AutoModelForImageTextToText.from_pretrained(hf).float().eval()
    native = getattr(model.config, "vision_start_token_id", None) is not None
    tokenizer, build = native_inputs(hf, model.config) if native else llava_inputs(hf)
    rows, folder = read_rows(data), os.path.dirname(os.path.abspath(data))
    right, total = collections.Counter(), collections.Counter()
    answers = collections.defaultdict(collections.Counter)
    for row in rows:
        reference = row["messages"][-1]["content"].strip().lower()
        got = answer(model, tokenizer, build, row, folder, max_new_tokens).strip().lower()
        for key in ("overall", row.get("kind")):
            if key:
                total[key] += 1
                right[key] += got == reference
        answers[row.get("kind", "overall")][reference] += 1
    result = {key: (right[key], total[key]) for key in total}
    result.update({f"chance/{k}": c.most_common(1)[0][1] / sum(c.values()) for k, c in answers.items()})
    result["chance/overall"] = sum(c.most_common(1)[0][1] for c in answers.values()) / len(rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="exported HF VLM folder, or a run folder whose newest export "
                        "(train.save_hf=true) is read")
    parser.add_argument("--data", default=DEFAULT_DATA, help="held-out JSONL rows with images")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    result = accuracy(hf_folder(args.hf), args.data, args.max_new_tokens)
    for key, value in sorted(result.items()):
        if not key.startswith("chance/"):
            chance = result.get(f"chance/{key}")
            guess = f" (guessing the most common answer: {100 * chance:.1f} %)" if chance is not None else ""
            print(f"{key}: {value[0]}/{value[1]} = {100 * value[0] / value[1]:.1f} %{guess}")


if __name__ == "__main__":
    main()
