"""Shared helpers: launch the real entry point under torchrun and read what it wrote."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"


@pytest.fixture(scope="module")
def world_of_one():
    """A one-process gloo world with megatron-core's parallel state (every size 1), for in-process tests of
    megatron-core modules; modules use it with ``pytestmark = pytest.mark.usefixtures("world_of_one")``."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_swift.backend import cpu_compat
    from megatron_swift.backend.device import _free_port

    cpu_compat.apply()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    yield
    ps.destroy_model_parallel()
    dist.destroy_process_group()  # other in-process tests start their own


def bpe_tokenizer(corpus: Sequence[str], specials: Sequence[str], vocab_size: int = 400):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on the fly (50 passes over ``corpus``), ``specials``
    first in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus) * 50, trainer)
    return tok


def free_port() -> int:
    """A port free now for a launch's rendezvous. Under the suite's two xdist workers each worker draws from its
    own range below Linux's ephemeral ports (32768+), so the other worker's launches and the kernel's own picks
    cannot take it between this check and torchrun's bind (seen: EADDRINUSE)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and worker[2:].isdigit():
        base = 20000 + 4000 * (int(worker[2:]) % 3)
        for _ in range(100):
            port = base + random.randrange(4000)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(nproc: int, overrides: Sequence[str], script: Path = TRAIN) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(script), *overrides]


def train_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_train(nproc: int, overrides: Sequence[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch/train.py under torchrun on CPU; fail the test with its output if it fails and check is set."""
    proc = subprocess.run(launch_cmd(nproc, ["train.device=cpu", *overrides]), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(output_dir) -> List[dict]:
    """Per-step rows of metrics.jsonl (evaluation rows excluded)."""
    path = Path(output_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    """A small JSONL text file written by the test."""
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": f"row {i}: the cat sat on mat number {i * 7 % 13} and looked at the door."} for i in range(200)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path

