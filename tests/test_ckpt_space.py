"""A disk that cannot hold the next checkpoint: one NoSpace line (exit 2), nothing half-written left behind, the
previous checkpoint intact; temporaries of a save that died are removed at the next start."""
from __future__ import annotations

import errno
import os

import pytest

from megatron_swift.training import checkpoint, ckpt_space, ckpt_store
from megatron_swift.training.errors import CheckpointError, NoSpace
from tests.test_checkpoint_errors import weights

pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/conftest.py


def save(out, iteration: int) -> str:
    return checkpoint._write(str(out), iteration, lambda: weights(float(iteration)), "x: 1\n",
                             {"iteration": iteration}, keep_last=3)


def test_a_disk_too_small_for_the_checkpoint_stops_before_writing(tmp_path, monkeypatch):
    first = save(tmp_path, 1)
    size = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "iter_0000001").iterdir())
    monkeypatch.setattr(ckpt_space, "free_bytes", lambda path: size // 2)
    with pytest.raises(NoSpace) as full:
        save(tmp_path, 2)
    assert isinstance(full.value, CheckpointError)  # cli: one line, exit 2
    assert str(full.value).startswith(f"no space left on {tmp_path / 'checkpoints'}: the checkpoint of step 2 "
                                      f"needs about ")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["iter_0000001"] and ckpt_store.verify(first) == []


def test_a_disk_that_fills_while_writing_is_one_line_and_the_temporary_goes(tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    first = save(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", full)
    with pytest.raises(NoSpace, match=r"^no space left on .*the checkpoint of step 2 did not fit, \d+ MB free"):
        save(tmp_path, 2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["iter_0000001"] and ckpt_store.verify(first) == []


def test_temporaries_of_a_save_that_died_are_removed(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "checkpoints" / ".tmp.iter_0000002").mkdir()
    (tmp_path / "checkpoints" / ".tmp.iter_0000002" / "__0_0.distcp").write_bytes(b"half")
    assert ckpt_store.remove_temporaries(str(tmp_path / "checkpoints")) == [".tmp.iter_0000002"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["iter_0000001"]
