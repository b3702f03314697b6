"""Benchmark HF <-> Megatron conversion on a synthetic checkpoint of about 1 GB or more.

    python tools/bench/convert_bench.py [--gb 1.1] [--shard-gb 0.5] [--nproc 1] [--workdir /tmp/swift-convert-bench]

Writes a random bf16 Qwen3-shaped HF checkpoint, then times, each in its own
process (tree), with peak resident memory sampled every 20 ms:

  plain     read every tensor of every safetensors file and write them again (the floor)
  imports   start Python and import the converter's libraries (fixed cost in every RSS figure)
  to-mcore  tools/convert/hf_to_mcore.py (under torchrun with --nproc ranks, PP across them)
  to-hf     tools/convert/mcore_to_hf.py (one process, streaming layer by layer)

and prints each time as a ratio to ``plain`` and each peak RSS (largest single
process) as a ratio to the largest safetensors shard. The round trip is
checked to be bitwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2048, 6144, 16, 8, 128, 32000


def _layer_bytes() -> int:
    attn = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2
    return 2 * (attn + 3 * HIDDEN * FFN + 2 * HIDDEN + 2 * HEAD_DIM)


def make_checkpoint(folder: str, gb: float, shard_gb: float, layer_multiple: int) -> dict:
    """A Qwen3ForCausalLM folder of random bf16 weights with as many layers as reach ``gb`` (a multiple of
    ``layer_multiple``, the pipeline stages)."""
    import torch

    from megatron_swift.convert.hf_export import ShardWriter

    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    layers = max(1, int((gb * 1e9 - fixed) // _layer_bytes()) + 1)
    layers = -(-layers // layer_multiple) * layer_multiple
    os.makedirs(folder)
    writer = ShardWriter(folder, int(shard_gb * 2**30))
    gen = torch.Generator().manual_seed(0)

    def add(name, *shape):
        writer.add(name, (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16))

    add("model.embed_tokens.weight", VOCAB, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        add(p + "self_attn.q_proj.weight", HEADS * HEAD_DIM, HIDDEN)
        add(p + "self_attn.k_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        add(p + "self_attn.v_proj.weight", KV_HEADS * HEAD_DIM, HIDDEN)
        add(p + "self_attn.o_proj.weight", HIDDEN, HEADS * HEAD_DIM)
        add(p + "self_attn.q_norm.weight", HEAD_DIM)
        add(p + "self_attn.k_norm.weight", HEAD_DIM)
        add(p + "mlp.gate_proj.weight", FFN, HIDDEN)
        add(p + "mlp.up_proj.weight", FFN, HIDDEN)
        add(p + "mlp.down_proj.weight", HIDDEN, FFN)
        add(p + "input_layernorm.weight", HIDDEN)
        add(p + "post_attention_layernorm.weight", HIDDEN)
    add("model.norm.weight", HIDDEN)
    add("lm_head.weight", VOCAB, HIDDEN)
    writer.close()
    config = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=HIDDEN, intermediate_size=FFN,
                  num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  head_dim=HEAD_DIM, vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", torch_dtype="bfloat16")
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return config


def _files(folder: str) -> list:
    return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))


PLAIN = """
import os, sys
from safetensors import safe_open
from safetensors.torch import save_file
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
for file in sorted(f for f in os.listdir(src) if f.endswith(".safetensors")):
    with safe_open(os.path.join(src, file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, os.path.join(dst, file), metadata={"format": "pt"})
    del tensors
"""

IMPORTS = "import megatron_swift.convert.to_mcore, megatron_swift.convert.hf_export"


def measure(cmd: list, env: dict) -> tuple:
    """(seconds, peak RSS of the largest single process, peak RSS of the whole tree) for one command."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak_one = peak_all = 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            rss = []
        if rss:
            peak_one, peak_all = max(peak_one, max(rss)), max(peak_all, sum(rss))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    output = proc.stdout.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{output[-4000:]}")
    return seconds, peak_one, peak_all


def check_bitwise(a: str, b: str) -> int:
    import torch
    from safetensors import safe_open

    def index(folder):
        out = {}
        for file in _files(folder):
            with safe_open(os.path.join(folder, file), framework="pt") as f:
                out.update({k: file for k in f.keys()})
        return out

    ia, ib = index(a), index(b)
    assert sorted(ia) == sorted(ib), "tensor names differ"
    for name, file in ia.items():
        with safe_open(os.path.join(a, file), framework="pt") as fa, safe_open(os.path.join(b, ib[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
    return len(ia)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.1, help="checkpoint size in GB (1e9 bytes)")
    parser.add_argument("--shard-gb", type=float, default=0.5, help="safetensors shard size (GiB), both ways")
    parser.add_argument("--nproc", type=int, default=1, help="ranks for hf_to_mcore (pipeline stages)")
    parser.add_argument("--workdir", default="/tmp/swift-convert-bench")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, plain, mcore, back = (os.path.join(args.workdir, n) for n in ("hf", "plain", "mcore", "hf-back"))
    config = make_checkpoint(hf, args.gb, args.shard_gb, args.nproc)
    total = sum(os.path.getsize(os.path.join(hf, f)) for f in _files(hf))
    largest = max(os.path.getsize(os.path.join(hf, f)) for f in _files(hf))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                "--master_port=29561"]
    runs = {
        "plain": [sys.executable, "-c", PLAIN, hf, plain],
        "imports": [sys.executable, "-c", IMPORTS],
        "to-mcore": [*torchrun, os.path.join(ROOT, "tools/convert/hf_to_mcore.py"), "--hf", hf, "--out", mcore,
                     "--pp", str(args.nproc), "train.device=cpu"],
        "to-hf": [sys.executable, os.path.join(ROOT, "tools/convert/mcore_to_hf.py"), "--ckpt", mcore, "--out", back,
                  "--max-shard-gb", str(args.shard_gb)],
    }
    print(f"checkpoint: {config['num_hidden_layers']} layers, {total / 1e9:.2f} GB bf16 in {len(_files(hf))} "
          f"files, largest shard {largest / 1e9:.2f} GB; to-mcore on {args.nproc} rank(s)", flush=True)
    results = {name: measure(cmd, env) for name, cmd in runs.items()}
    tensors = check_bitwise(hf, back)
    base = results["plain"][0]
    print(f"{'step':<10}{'seconds':>9}{'x plain':>9}{'peak RSS/proc':>15}{'x shard':>9}{'tree RSS':>10}")
    for name, (sec, one, tree) in results.items():
        ratio = "" if name == "imports" else f"{sec / base:9.2f}"
        print(f"{name:<10}{sec:9.1f}{ratio:>9}{one / 1e9:13.2f}GB{one / largest:9.2f}{tree / 1e9:8.2f}GB")
    print(f"round trip HF -> Megatron -> HF: {tensors} tensors bitwise equal")


if __name__ == "__main__":
    main()
