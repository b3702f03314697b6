"""Start a training command in the background and stop it the way an operator (or a scheduler) does.

torchrun starts each worker in a session of its own, so killing torchrun's
process group leaves the workers running: ``kill_tree`` signals every
descendant explicitly, workers first.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import psutil
import pytest

from tests.conftest import ROOT, launch_cmd, train_env


def start(nproc: int, overrides: Sequence[str], cwd=ROOT, log: Optional[Path] = None) -> subprocess.Popen:
    """torchrun + launch/train.py on CPU in the background; output to ``log`` (or discarded)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(launch_cmd(nproc, ["train.device=cpu", *overrides]), cwd=cwd, env=train_env(),
                            stdout=out, stderr=subprocess.STDOUT)


def run(nproc: int, overrides: Sequence[str], cwd=ROOT, script: Optional[Path] = None,
        timeout: int = 300) -> subprocess.CompletedProcess:
    """Run to the end on CPU (``script``: a test worker instead of launch/train.py); fail the test if it fails."""
    cmd = launch_cmd(nproc, [*overrides, "train.device=cpu"], **({"script": script} if script else {}))
    proc = subprocess.run(cmd, cwd=cwd, env=train_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every descendant of ``pid`` (deepest first), then to ``pid``; wait until all are gone."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = root.children(recursive=True)[::-1] + [root]
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"still running after {sig}: {alive}"


def last_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines() if line.strip()]
    return steps[-1] if steps else 0


def wait_until(proc: subprocess.Popen, done: Callable[[], bool], timeout: float = 240) -> None:
    """Poll ``done`` while ``proc`` runs; fail if it ends first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if done():
            return
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the awaited point"
        time.sleep(0.02)
    raise AssertionError("the run made no progress")


def metrics_file(output_dir: Path) -> Path:
    return output_dir / "metrics.jsonl"
