"""A save cannot hang: shards are written by threads of the rank, never by a process forked from a threaded
one (training/ckpt_writer.py), and a save still running after its deadline ends the rank with one line
(training/save_deadline.py). Each case runs in its own process (tests/save_worker.py)."""
from __future__ import annotations

import subprocess
import sys
import time

from tests.conftest import ROOT, train_env


def save(mode: str, out, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tests" / "save_worker.py"), mode, str(out), str(timeout_s)],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=90)


def test_a_save_with_many_threads_and_a_lock_held_across_fork_completes(tmp_path):
    proc = save("fork-lock", tmp_path, 60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "iter_0000001" / "megatron_swift.json").is_file()


def test_a_stuck_writer_ends_the_save_with_one_line_within_its_deadline(tmp_path):
    start = time.monotonic()
    proc = save("stuck-writer", tmp_path, 3)
    assert time.monotonic() - start < 60
    assert proc.returncode == 4, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megatron-swift: error:")]
    assert len(lines) == 1 and "saving the checkpoint of step 1" in lines[0] and "did not finish in 3 s" in lines[0]
    assert "Traceback" not in proc.stderr
    assert "ckpt_writer.py" in (tmp_path / "save_stuck.rank0.txt").read_text()  # where it was stuck
    assert not (tmp_path / "checkpoints" / "iter_0000001").exists()  # only the .tmp folder was started
