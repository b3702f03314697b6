"""The GPU check: every kind of run once on one device, a kill-and-resume, a precision check and the benchmark.

    python tools/gpu_check.py                 # everything (about 10 minutes on one H100)
    python tools/gpu_check.py --skip-bench --jobs 4   # the runs only, four at a time (a minute or two)
    python tools/gpu_check.py --device cpu --skip-bench --steps 4   # the same runs on CPU (smoke test)

Each item is a subprocess running what a user types (launch/train.py under torchrun with one rank, the
convert tools, tools/bench/vs_hf.py); each prints PASS/FAIL with its figures, and the exit code is the
number of failures. The test suite never needs a GPU; this script is what to run when one is lent.

On the lent machine (Python 3.12, torch with CUDA, transformers, safetensors, tokenizers, sentencepiece,
psutil, tensorboard; no megatron-core, Hydra or omegaconf, no network), carry their wheels. Here:
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1 hydra-core==1.3.2 omegaconf==2.3.0
    pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
and there (carry .whl):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 tools/gpu_check.py
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
FAILURES = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def torchrun(args, cwd, device: str, timeout: int = 600, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(TRAIN), *args, f"train.device={device}", "logging.tensorboard=false"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["iteration"]: r for r in rows if "loss" in r}


def run_folder(stdout: str, cwd: Path) -> Path:
    return cwd / re.search(r"run folder (\S+) \(", stdout).group(1)


def failure(proc) -> str:
    """The lines that say what went wrong (torchrun's own report, last, says only that a rank failed)."""
    text = proc.stdout + proc.stderr
    errors = [line for line in text.splitlines() if "Error" in line or "error:" in line]
    return "\n".join(errors[:8])[-1500:] or text[-1500:]


def training_run(name: str, args, cwd: Path, device: str) -> None:
    """One run as a user types it; reports its first and last loss, tokens/s and memory."""
    start = time.time()
    proc = torchrun(args, cwd, device)
    if proc.returncode != 0:
        return report(name, False, failure(proc))
    rows = losses(run_folder(proc.stdout, cwd))
    first, last = rows[min(rows)], rows[max(rows)]
    finite = all(r["loss"] == r["loss"] for r in rows.values())
    report(name, finite, f"loss {first['loss']:.4f} -> {last['loss']:.4f} over {len(rows)} steps, "
                         f"{last['tokens_per_s']:,.0f} tok/s, {last['memory_gib']:.2f} GiB, {time.time() - start:.0f} s")


def tiny_hf(folder: Path) -> Path:
    """A random tiny Qwen3 HF model with a 300-token vocabulary (the byte tokenizer fits)."""
    import torch
    import transformers

    config = transformers.Qwen3Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder)
    return folder


def kill_and_resume(cwd: Path, device: str, steps: int) -> None:
    """SIGKILL every process after a checkpoint, resume with the same command, compare with an unbroken run."""
    total = max(steps, 12)
    args = ["+model=qwen3", f"train.train_iters={total}", "train.save_interval=4", "model.hidden_dropout=0.1"]
    whole = torchrun([*args, f"train.output_dir={cwd / 'whole'}"], cwd, device)
    if whole.returncode != 0:
        return report("kill-and-resume", False, whole.stderr[-1500:])
    out = cwd / "broken"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone", str(TRAIN),
           *args, f"train.output_dir={out}", f"train.device={device}", "logging.tensorboard=false"]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(losses(out)) >= 6:
            break
        time.sleep(0.05)
    for p in psutil.Process(proc.pid).children(recursive=True)[::-1] + [psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    again = torchrun([*args, f"train.output_dir={out}"], cwd, device)
    resumed = re.search(r"resumed from \S+ at step (\d+)", again.stdout)
    if again.returncode != 0 or not resumed:
        return report("kill-and-resume", False, (again.stdout + again.stderr)[-1500:])
    a, b = losses(cwd / "whole"), losses(out)
    diff = max(abs(a[s]["loss"] - b[s]["loss"]) for s in a)
    report("kill-and-resume", sorted(a) == sorted(b) and diff < 1e-3,
           f"resumed at step {resumed.group(1)}; max |loss difference| over {len(a)} steps {diff:.3g}")


def precision_check(hf: Path, cwd: Path, device: str) -> None:
    for backend in ("sdpa", "local"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone",
               str(ROOT / "tools" / "convert" / "check.py"), "--hf", str(hf), "train.precision=bf16",
               f"train.device={device}", f"model.attention_backend={backend}"]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
        summary = [line for line in proc.stdout.splitlines() if "logits vs HF" in line]
        report(f"check.py bf16 ({backend})", proc.returncode == 0 and bool(summary),
               " | ".join(summary)[-400:] if summary else failure(proc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=20, help="steps of each training run")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="checks run side by side (the benchmark runs alone)")
    args = parser.parse_args()
    cwd = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    hf, n = tiny_hf(cwd / "tiny-qwen3"), f"train.train_iters={args.steps}"
    runs = {
        "pretraining": ["+model=qwen3", n],
        "packed SFT": ["+model=qwen3", "data=sft", "data.packing=true", "train.seq_length=512",
                       "train.micro_batch_size=1", "train.global_batch_size=4", n],
        "DPO": ["+model=qwen3", f"model.pretrained={hf}", "data=prefs", "data.tokenizer=byte", "task=dpo",
                "train.seq_length=96", "train.lr=1e-3", n],
        "KTO": ["+model=qwen3", f"model.pretrained={hf}", "data=kto", "data.tokenizer=byte", "task=kto",
                "train.seq_length=96", n],
        "RM (+HF export)": ["+model=qwen3", f"model.pretrained={hf}", "data=prefs", "data.tokenizer=byte", "task=rm",
                            "train.seq_length=96", "train.save_hf=true", n],
        "LoRA SFT (+merged export)": ["+model=qwen3", f"model.pretrained={hf}", "data=sft", "data.tokenizer=byte",
                                      "tuner=lora", "train.seq_length=256", "train.save_hf=true", n],
        "GRPO (rollouts, reference, sampling)": [
            "+model=qwen3", f"model.pretrained={hf}", "data=prompts", "data.tokenizer=byte", "task=grpo",
            "task.num_generations=4", "train.global_batch_size=8", "train.micro_batch_size=4",
            "task.max_completion_length=32", "train.seq_length=128", "task.rewards=[accuracy,repetition]",
            "task.steps_per_generation=2", n],
        # A VLM (tiny LLaVA: CLIP + Qwen2) on the bundled shapes set, images through the projector, bf16.
        "VLM SFT (llava, images)": ["+model=llava", "data=vl_sft", "train.train_vision=true", n],
    }
    checks = [lambda n=name, a=run_args: training_run(n, a, cwd, args.device) for name, run_args in runs.items()]
    checks += [lambda: kill_and_resume(cwd, args.device, args.steps), lambda: precision_check(hf, cwd, args.device)]
    # The runs are tiny: side by side they share the GPU (and the machine's cores) without waiting.
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done in [pool.submit(check) for check in checks]:
            done.result()
    if not args.skip_bench:
        for shape in ("1.7b", "8b-width", "0.6b-32k"):
            proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "vs_hf.py"), "--shape", shape],
                                  capture_output=True, text=True, timeout=1200)
            report(f"vs_hf {shape}", proc.returncode == 0, "\n      " + (proc.stdout or proc.stderr)[-1500:])
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "packed.py"), "--shape", "1.7b"],
                              capture_output=True, text=True, timeout=1200)
        report("packed vs unpacked 1.7b", proc.returncode == 0, "\n      " + (proc.stdout or proc.stderr)[-800:])
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench" / "rollout.py"), "--device", "cuda",
                               "--dtype", "bf16", "--batch", "64", "--new", "128"],
                              capture_output=True, text=True, timeout=1200)
        report("rollout vs transformers generate", proc.returncode == 0,
               "\n      " + (proc.stdout or proc.stderr)[-800:])
    print(f"{len(FAILURES)} failed: {', '.join(FAILURES)}" if FAILURES else "all passed", flush=True)
    sys.exit(len(FAILURES))


if __name__ == "__main__":
    main()
