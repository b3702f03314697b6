"""Shared helpers: launch the real entry point under torchrun and read what it wrote."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"


def free_port() -> int:
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
