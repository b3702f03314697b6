"""Side by side on one device: megatron-swift, a bare megatron-core loop, and plain HF transformers training.

The same shape, sequence length and global batch of random tokens through

* project: ``Trainer.step()`` of the trainer's own set-up (data=mock);
* bare: a minimal megatron-core loop on the same model (tools/bench/step_overhead.bare_step);
* hf: ``transformers`` Qwen3ForCausalLM with SDPA attention, fp32 master weights under bf16 autocast
  (fp32 on CPU), fused AdamW where the device has it: how people train without Megatron.

Each runs in its own process (clean peak memory). Printed per path: tokens/s, TFLOP/s per device with
the project's stated formula for all three (training/flops.py), peak memory, and the ratios project/hf,
project/bare. MFU uses the device's dense bf16 peak (backend.device).

    python tools/bench/vs_hf.py --shape 1.7b            # one GPU: qwen3-1.7b, seq 4096, mbs 1, gbs 4
    python tools/bench/vs_hf.py --shape 8b-width        # qwen3-8b width, 8 layers
    python tools/bench/vs_hf.py --shape tiny --steps 3  # CPU smoke run
    python tools/bench/vs_hf.py --shape 1.7b -- model.attention_backend=local   # overrides for the project
    python tools/bench/vs_hf.py --shape 1.7b --paths project --data packed    # packed SFT rows (tools/bench/packed.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SHAPES = {  # qwen3 sizes from the family table, with layer overrides; (seq, micro batch, global batch)
    "1.7b": (["model.size=1.7b"], 4096, 1, 4),
    "8b-width": (["model.size=8b", "model.num_layers=8"], 4096, 1, 4),
    "tiny": (["model.size=tiny"], 128, 2, 4),
    # Long context on one GPU (issue 15's single-device figure): one 32k-token row per step.
    "0.6b-32k": (["model.size=0.6b"], 32768, 1, 1),
}


def _sft_file(seq: int, samples: int = 4000) -> str:
    """Synthetic conversations of about seq/40 to seq/3 bytes (byte tokenizer: tokens; 100 to 1,500 at seq
    4096) for packed rows, written once."""
    import random

    path = os.path.join(tempfile.gettempdir(), f"vs_hf_sft_{seq}_{samples}.jsonl")
    if not os.path.exists(path):
        rng, words = random.Random(0), ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "zeta"]
        with open(path + ".part", "w") as f:
            for _ in range(samples):
                text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
                n = rng.randint(max(seq // 256, 2), max(seq // 16, 3))
                f.write(json.dumps({"messages": [{"role": "user", "content": text(n // 3)},
                                                 {"role": "assistant", "content": text(n - n // 3)}]}) + "\n")
        os.replace(path + ".part", path)
    return path


def _data(kind: str, seq: int) -> list:
    """mock: random tokens in full rows; packed: the synthetic conversations packed into rows (SFT)."""
    if kind == "mock":
        return ["data=mock"]
    return ["data=sft", f"data.path=[{_sft_file(seq)}]", "data.packing=true"]


def _overrides(shape: str, extra, data: str = "mock") -> list:
    sizes, seq, mbs, gbs = SHAPES[shape]
    return ["+model=qwen3", *sizes, *_data(data, seq), f"train.seq_length={seq}", f"train.micro_batch_size={mbs}",
            f"train.global_batch_size={gbs}", "logging.tensorboard=false", *extra]


def _timed(step, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def _megatron(path: str, args) -> dict:
    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup
    from tools.bench.step_overhead import bare_step

    out = tempfile.mkdtemp(prefix="vs_hf_")
    cfg = compose([*_overrides(args.shape, args.overrides, args.data), f"train.train_iters={args.steps + args.warmup + 1}",
                   "train.save_at_end=false", "train.save_at_epoch_end=false", "train.max_epochs=null",
                   f"train.output_dir={out}"])
    trainer = setup(cfg)
    trainer.sinks.printer = lambda *_: None
    batches = trainer._microbatches(trainer.train_data, trainer.sampler, 0)
    step = trainer.step if path == "project" else (lambda: bare_step(trainer, batches))
    seconds = _timed(step, args.steps, args.warmup, trainer.backend.synchronize)
    trainer.sinks.close()
    return dict(seconds=seconds, flops=trainer.flops_per_step, memory_gib=trainer.backend.memory_gib(),
                peak_tflops=trainer.backend.peak_tflops(), device=trainer.backend.device_name(),
                attention=trainer.backend.attention, tokens=cfg.train.global_batch_size * cfg.train.seq_length)


def _hf(args) -> dict:
    import torch
    import transformers

    from megatron_swift.backend.device import resolve_device
    from megatron_swift.config.compose import compose
    from megatron_swift.config.validate import validate
    from megatron_swift.models.arch import padded_vocab_size
    from megatron_swift.training.flops import flops_per_step

    from megatron_swift.data.tokenizer import build_tokenizer

    cfg = compose(_overrides(args.shape, args.overrides))
    arch = validate(cfg, 1)
    if not arch.vocab_size:  # sizes without a vocabulary take the tokenizer's, as the trainer does
        arch = dataclasses.replace(arch, vocab_size=build_tokenizer(cfg.data.tokenizer or "byte").vocab_size)
    device = resolve_device("auto")
    config = transformers.Qwen3Config(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups, head_dim=arch.kv_channels, rms_norm_eps=arch.norm_epsilon,
        rope_theta=arch.rotary_base, max_position_embeddings=cfg.train.seq_length,
        tie_word_embeddings=not arch.untie_embeddings, attn_implementation="sdpa")
    with torch.device(device):  # initialised where it trains (a 2B model's CPU init alone takes a minute)
        model = transformers.Qwen3ForCausalLM(config).train()
    fused = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    seq, mbs, gbs = cfg.train.seq_length, cfg.train.micro_batch_size, cfg.train.global_batch_size
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = [torch.randint(0, arch.vocab_size, (mbs, seq), generator=g).to(device) for _ in range(gbs // mbs)]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        for tokens in batches:
            with autocast:
                loss = model(input_ids=tokens, labels=tokens).loss / len(batches)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    seconds = _timed(step, args.steps, args.warmup, sync)
    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, 1)
    if device == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**30
    else:  # the resident set, as the trainer reports it on CPU (backend.memory_gib)
        import psutil

        memory = psutil.Process().memory_info().rss / 2**30
    return dict(seconds=seconds, flops=flops_per_step(arch, seq, padded, gbs), memory_gib=memory,
                tokens=gbs * seq)


def _child(args) -> None:
    if args.path == "hf":
        result = _hf(args)
    else:
        from megatron_swift import backend

        os.environ.setdefault("MASTER_PORT", str(backend.device._free_port()))
        result = _megatron(args.path, args)
    print("RESULT " + json.dumps(result), flush=True)


def _report(results: dict) -> None:
    meta = results.get("project") or results.get("bare") or {"device": "?", "attention": "?"}
    peak = meta.get("peak_tflops")
    print(f"device {meta['device']}, attention={meta['attention']}; MFU against "
          f"{'%.0f TFLOP/s (dense bf16 peak of this device)' % peak if peak else 'no known peak'}")
    for name, r in results.items():
        tflops = r["flops"] / r["seconds"] / 1e12
        mfu = f", MFU {100 * tflops / peak:.1f} %" if peak else ""
        print(f"{name:8s} {r['tokens'] / r['seconds']:>12,.0f} tokens/s  {tflops:8.2f} TFLOP/s{mfu}  "
              f"peak memory {r['memory_gib']:.2f} GiB")
    if {"project", "bare", "hf"} <= set(results):
        p, b, h = (results[k]["seconds"] for k in ("project", "bare", "hf"))
        print(f"project/hf tokens/s {h / p:.3f} (target >= 1.25)   project/bare {b / p:.3f} (target within 3 %)")


def shape_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every benchmark over SHAPES takes (this one and tools/bench/packed.py)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.7b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    return parser


def main() -> None:
    parser = shape_parser(__doc__)
    parser.add_argument("--paths", default="project,bare,hf", help="which of project,bare,hf to run")
    parser.add_argument("--data", choices=("mock", "packed"), default="mock",
                        help="project/bare rows: random tokens, or SFT conversations packed into rows")
    parser.add_argument("--path", choices=("project", "bare", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for the project and bare runs")
    args = parser.parse_args()
    if args.path:
        return _child(args)
    _report(run_paths(args.shape, args.paths.split(","), args.data, args.steps, args.warmup, args.overrides))


def run_paths(shape: str, paths, data: str = "mock", steps: int = 10, warmup: int = 3, overrides=()) -> dict:
    """Each path in its own process; {path: result} (tools/bench/packed.py uses this too)."""
    results = {}
    for path in paths:
        cmd = [sys.executable, os.path.abspath(__file__), "--shape", shape, "--steps", str(steps),
               "--warmup", str(warmup), "--data", data, "--path", path, "--", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{path} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[path] = json.loads(line[len("RESULT "):])
    return results


if __name__ == "__main__":
    main()
