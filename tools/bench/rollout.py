"""Rollout speed: tokens/s of the megatron rollout engine against transformers' ``generate``, same model, same
prompts, greedy, same number of new tokens per prompt (a stop token that never comes).

A small random Qwen3 is written as an HF folder; transformers generates the batch at once (left padding,
attention mask, KV cache) in this process; the project's engine generates it through the trainer's own
megatron-core model (left padding, static KV cache) in a torchrun worker. Both make a warm-up call; then
they take turns (one timed call each, ``--repeat`` rounds, the other waiting idle), so that both see the same
machine: on a shared CPU a minute can change speeds by 10 %. The fastest call of each counts. Prints tokens/s
of each and the ratio (target >= 1.0 on CPU).

    python tools/bench/rollout.py                              # CPU: batch 16, 64 new tokens
    python tools/bench/rollout.py --batch 32 --new 128 --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False)
NEVER = 4095  # the stop token: a random model's greedy path does not reach it in these runs (checked below)


def _prompts(batch: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 4000, (int(n),), generator=g).tolist() for n in torch.randint(16, 64, (batch,), generator=g)]


def _hf(folder: str, prompts, new: int, device: str, dtype: str):
    """transformers' generate, warmed up; returns a function that times one call (seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every row's next token is at the end
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  eos_token_id=NEVER, pad_token_id=0)

    def timed() -> float:
        _sync(device)
        start = time.perf_counter()
        out = run()
        _sync(device)
        assert out.shape[1] - width == new
        return time.perf_counter() - start

    run()
    return timed


def _turn(work: str, name: str, alive=lambda: True) -> str:
    """Wait for the file ``name`` in ``work`` (the other process's signal) and return its text. Gives up when
    ``alive()`` turns false (the worker died) or the other side wrote ``abort`` (the bench failed)."""
    path = os.path.join(work, name)
    while not os.path.exists(path):
        if os.path.exists(os.path.join(work, "abort")):
            raise SystemExit("rollout bench: aborted by the other process")
        if not alive():
            raise SystemExit(f"rollout bench: the engine worker ended before {name} (see its output above)")
        time.sleep(0.01)
    return open(path).read()


def _signal(work: str, name: str, text: str = "") -> None:
    tmp = os.path.join(work, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(work, name))


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _engine_worker(work: str, new: int, repeat: int, overrides) -> None:
    import torch
    import torch.distributed as dist

    from megatron_swift.config.compose import compose
    from megatron_swift.rollout.megatron_engine import MegatronEngine
    from megatron_swift.rollout.sampling import SamplingParams
    from megatron_swift.training.loop import setup

    trainer = setup(compose(["+model=qwen3", f"model.pretrained={work}", "data.tokenizer=byte",
                             "train.seq_length=256", "train.global_batch_size=1", "train.micro_batch_size=1",
                             "logging.tensorboard=false", f"train.output_dir={tempfile.mkdtemp(prefix='rollout_')}",
                             *overrides]))
    prompts = json.loads(open(os.path.join(work, "prompts.json")).read())
    engine = MegatronEngine(trainer.model, trainer.backend.torch_device, trainer.arch.vocab_size)
    params = SamplingParams(max_new_tokens=new, temperature=0, stop_token_ids=[NEVER])
    engine.generate(prompts, params)
    first = dist.get_rank() == 0
    if first:
        _signal(work, "engine.ready", str(torch.get_num_threads()))
    for i in range(repeat):
        _turn(work, f"go.{i}")
        trainer.backend.synchronize()
        start = time.perf_counter()
        result = engine.generate(prompts, params)
        trainer.backend.synchronize()
        seconds = time.perf_counter() - start
        assert all(len(c) == new for c in result.token_ids)
        if first:
            _signal(work, f"done.{i}", str(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed calls of each after the warm-up, alternating; the fastest counts")
    parser.add_argument("overrides", nargs="*", help="extra trainer overrides (after --)")
    args = parser.parse_args()
    if args.repeat < 1 or args.batch < 1 or args.new < 1:
        parser.error("--repeat, --batch and --new must be >= 1")

    import torch
    import transformers

    work = tempfile.mkdtemp(prefix="rollout_bench_")
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE)).save_pretrained(work)
    prompts = _prompts(args.batch)
    with open(os.path.join(work, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    precision = {"fp32": "fp32", "bf16": "bf16"}[args.dtype]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29731",
           os.path.abspath(__file__), "--worker", work, str(args.new), str(args.repeat),
           f"train.device={args.device}", f"train.precision={precision}", *args.overrides]
    worker = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    alive = lambda: worker.poll() is None  # noqa: E731
    try:
        engine_threads = _turn(work, "engine.ready", alive)  # the worker has built and warmed up; now it waits
        hf_call = _hf(work, prompts, args.new, args.device, args.dtype)
        hf, engine = [], []
        for i in range(args.repeat):  # turns: neither runs while the other is timed
            hf.append(hf_call())
            _signal(work, f"go.{i}")
            engine.append(float(_turn(work, f"done.{i}", alive)))
    except BaseException:
        _signal(work, "abort")  # the worker leaves its wait; torchrun ends it on SIGTERM otherwise
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        raise
    if worker.wait(timeout=120) != 0:
        raise SystemExit(f"the engine worker failed (exit {worker.returncode})")
    tokens = len(prompts) * args.new
    hf_rate, engine_rate = tokens / min(hf), tokens / min(engine)
    threads = f", {torch.get_num_threads()}/{engine_threads} threads" if args.device == "cpu" else ""
    print(f"rollout, batch {args.batch} x {args.new} new tokens, {args.device} {args.dtype}{threads}: "
          f"megatron engine {engine_rate:,.0f} tok/s, transformers generate {hf_rate:,.0f} tok/s, "
          f"ratio {engine_rate / hf_rate:.2f} (fastest of {args.repeat} alternating calls each)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _engine_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    else:
        main()
