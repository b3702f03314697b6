"""One run per folder: the lock names its holder to a second run, dies with its process, and writes nothing
until the run claims the folder."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_swift.config.validate import ConfigError
from megatron_swift.training import run_lock
from tests.conftest import ROOT

HOLD = "import sys, time; from megatron_swift.training import run_lock; run_lock.claim(sys.argv[1]); " \
       "print('held', flush=True); time.sleep(120)"


def holder(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_folder_and_the_holder_until_the_holder_dies(tmp_path):
    folder = tmp_path / "run"
    first = holder(folder)
    try:
        with pytest.raises(ConfigError) as refused:
            run_lock.acquire(str(folder))
        (line,) = refused.value.problems
        assert f"run folder {folder} is in use by another run (pid {first.pid} on " in line
        assert "another train.output_dir" in line
        with pytest.raises(ConfigError):
            run_lock.claim(str(folder))
    finally:
        first.kill()  # SIGKILL: no chance to clean up; the kernel drops the lock
        first.wait()
    assert run_lock.acquire(str(folder)) is None
    run_lock.release(str(folder))


def test_locking_a_folder_writes_nothing_in_it(tmp_path):
    (tmp_path / "old").write_text("a previous run's file")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()), os.stat(tmp_path).st_mtime_ns
    assert run_lock.acquire(str(tmp_path)) is None and run_lock.acquire(str(tmp_path / "not-yet")) is None
    assert (sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()), os.stat(tmp_path).st_mtime_ns) == before
    run_lock.release(str(tmp_path))
