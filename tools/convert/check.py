"""Precision check: one batch through the HF model and through the Megatron model built from it.

    python tools/convert/check.py --hf /ckpt/Qwen3-8B                       # HF weights loaded into Megatron
    torchrun --nproc_per_node 2 tools/convert/check.py --hf DIR parallel.tp=2
    python tools/convert/check.py --hf DIR --ckpt outputs/run               # a Megatron checkpoint vs an HF folder
    python tools/convert/check.py --hf /ckpt/Qwen2.5-VL-3B-Instruct --image photo.jpg   # a VLM on a real image

Prints mean and max absolute logit difference and top-1 token agreement (fp32
on CPU unless overridden). Extra arguments are config overrides.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def megatron_logits(trainer, tokens, position_ids=None, **vision):
    """Full-vocabulary logits [b, s, padded V] on the last pipeline stage (None elsewhere); ``vision``: a VLM's
    image_index and media (family.check_inputs)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_swift.training.forward_only import collect

    tokens = tokens.to(trainer.backend.torch_device)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens) if position_ids is None \
        else position_ids.to(tokens.device)
    for chunk in trainer.model:
        chunk.eval()
    out = collect(trainer.model, [tokens], lambda t, chunk: chunk(t, positions, None, **vision),
                  lambda _, logits: gather_from_tensor_model_parallel_region(logits), tokens.shape[1],
                  tokens.shape[0])
    return out[0].float().cpu() if ps.is_pipeline_last_stage() else None


def compare(megatron, hf, vocab: int) -> dict:
    """Mean/max |difference| over the real vocabulary and top-1 agreement."""
    diff = (megatron[..., :vocab] - hf).abs()
    agree = (megatron[..., :vocab].argmax(-1) == hf.argmax(-1)).float().mean()
    return {"mean_abs_diff": diff.mean().item(), "max_abs_diff": diff.max().item(), "token_agreement": agree.item()}


def _hf_logits(folder: str, tokens, image_inputs=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if image_inputs is not None:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(**image_inputs).logits.float()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF checkpoint folder")
    parser.add_argument("--ckpt", help="Megatron checkpoint to compare instead of the HF weights loaded directly")
    parser.add_argument("--batch", type=int, default=2, help="rows of random tokens")
    parser.add_argument("--seq", type=int, default=32, help="tokens per row")
    parser.add_argument("--image", nargs="+", help="a VLM folder: one row of random text around these images "
                        "(through the folder's own image processor) instead of random token rows")
    parser.add_argument("--report", help="also write the figures to this JSON file")
    return parser.parse_known_args()  # parsed before the heavy imports: --help answers at once


def _check(args, overrides) -> None:
    """Build both models, compare their logits, report (rank of the last stage); expected failures raise."""
    import shutil
    import tempfile

    import torch
    import torch.distributed as dist
    from megatron_swift.config.compose import compose
    from megatron_swift.convert.hf_config import read_hf_config
    from megatron_swift.models.families import hf_family_name
    from megatron_swift.training.loop import setup

    hf_config = read_hf_config(args.hf)
    family = hf_family_name(hf_config, args.hf)
    vocab = (hf_config.get("text_config") or hf_config)["vocab_size"]
    tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    image = _image_inputs(args, hf_config, family) if args.image else {"hf": None, "megatron": {"tokens": tokens}}
    # The HF reference runs on the last rank (the last pipeline stage, where Megatron's logits are),
    # and before the Megatron model is built: only its logits are kept, so the two models never
    # share memory.
    reporter = os.environ.get("RANK", "0") == str(int(os.environ.get("WORLD_SIZE", "1")) - 1)
    hf_logits = _hf_logits(args.hf, tokens, image["hf"]) if reporter else None
    out_dir = os.path.join(tempfile.gettempdir(), f"swift-check-{os.environ.get('MASTER_PORT', 'solo')}")
    try:
        # setup() prints a training run's lines (run folder, data, parameters): not what this tool reports.
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = setup(compose([f"+model={family}", f"model.pretrained={args.hf}", "train.precision=fp32",
                                     f"train.output_dir={out_dir}", "train.resume=auto", "logging.tensorboard=false",
                                     *([f"model.load={args.ckpt}"] if args.ckpt else []), *overrides]))
        logits = megatron_logits(trainer, **image["megatron"])
        if hf_logits is not None:
            report = compare(logits, hf_logits, vocab)
            print(f"logits vs HF: mean |diff| {report['mean_abs_diff']:.3e}, max |diff| {report['max_abs_diff']:.3e}, "
                  f"top-1 agreement {100 * report['token_agreement']:.2f} %", flush=True)
            if args.report:
                with open(args.report, "w", encoding="utf-8") as f:
                    json.dump(report, f)
        dist.barrier()
    finally:  # the run folder setup() needed: nothing of it is worth keeping, also when the check fails
        if os.environ.get("RANK", "0") == "0":
            shutil.rmtree(out_dir, ignore_errors=True)


def _image_inputs(args, hf_config: dict, family_name: str) -> dict:
    """The family's one-row image batch (models.families.base.Family.check_inputs); a bad image or a family
    without an image check is one line."""
    import torch

    from megatron_swift.data.errors import DataError
    from megatron_swift.data.images import image_problem, open_image
    from megatron_swift.models import families

    for path in args.image:
        problem = image_problem(os.path.abspath(path))
        if problem:
            raise DataError(path, None, f"--image: {problem}")
    try:
        return families.get(family_name).check_inputs(args.hf, hf_config, [open_image(p) for p in args.image],
                                                      args.seq, torch.Generator().manual_seed(0))
    except NotImplementedError as e:
        raise DataError(args.hf, None, str(e)) from None


def main() -> None:
    args, overrides = _arguments()
    from megatron_swift.cli import run_or_exit

    run_or_exit(_check, args, overrides)

if __name__ == "__main__":
    main()
