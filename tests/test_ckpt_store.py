"""Checkpoints on disk: manifests catch every kind of damage, and pruning can be interrupted anywhere
without leaving something that counts as complete."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from megatron_swift.training import ckpt_store


pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/conftest.py


def fake_checkpoint(ckpt_dir, iteration: int):
    """A folder like a saved checkpoint: shards, then a record with their manifest (written last)."""
    folder = ckpt_dir / ckpt_store.iter_name(iteration)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(os.urandom(4096))
    (folder / ".metadata").write_bytes(b"metadata" * 10)
    manifest = ckpt_store.make_manifest(str(folder))
    (folder / ckpt_store.META).write_text(json.dumps({"iteration": iteration, "complete": True,
                                                      "manifest": manifest}))
    return folder


def test_manifest_names_what_is_wrong(tmp_path):
    folder = fake_checkpoint(tmp_path, 5)
    assert ckpt_store.verify(str(folder)) == []
    shard = folder / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1  # one bit
    shard.write_bytes(bytes(data))
    assert ckpt_store.verify(str(folder)) == ["__0_0.distcp does not match its checksum"]
    (folder / ".metadata").write_bytes(b"meta")
    assert ".metadata has 4 bytes, 80 were written" in ckpt_store.verify(str(folder))
    shard.unlink()
    assert "__0_0.distcp is missing" in ckpt_store.verify(str(folder))
    (folder / ckpt_store.META).write_text("{not json")
    problems = ckpt_store.verify(str(folder))
    assert len(problems) == 1 and f"checkpoint {folder}: cannot read megatron_swift.json" in problems[0]


class PowerCut(Exception):
    """Stands for the process dying at that point."""


def test_pruning_removes_the_record_first_and_an_interrupted_prune_is_cleaned_up(tmp_path, monkeypatch):
    for i in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, i)
    seen, rmtree = [], shutil.rmtree

    def crash(path, ignore_errors=False):  # the machine dies as the first folder's shards go
        seen.append(os.path.exists(os.path.join(path, ckpt_store.META)))
        raise PowerCut

    monkeypatch.setattr(ckpt_store.shutil, "rmtree", crash)
    with pytest.raises(PowerCut):
        ckpt_store.prune(str(tmp_path), keep_last=2)
    assert seen == [False]  # the record was already gone when the shards started to go
    monkeypatch.setattr(ckpt_store.shutil, "rmtree", rmtree)
    complete = [os.path.basename(p) for p in ckpt_store.complete_checkpoints(str(tmp_path))]
    assert complete == ["iter_0000002", "iter_0000003", "iter_0000004"]  # iter 1 no longer counts
    ckpt_store.prune(str(tmp_path), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000004"]


def test_quarantine_moves_a_damaged_checkpoint_out_of_the_candidates(tmp_path):
    for i in (1, 2):
        fake_checkpoint(tmp_path, i)
    moved = ckpt_store.quarantine(str(tmp_path / "iter_0000002"))
    assert moved.endswith("iter_0000002.corrupt") and os.path.isdir(moved)
    assert [os.path.basename(p) for p in ckpt_store.complete_checkpoints(str(tmp_path))] == ["iter_0000001"]
    ckpt_store.prune(str(tmp_path), keep_last=1)  # pruning leaves the quarantined folder for inspection
    assert os.path.isdir(moved)


def test_incomplete_iter_folders_are_named(tmp_path):
    """An empty or half-written newest iter_N is passed over, and said so (training/run_dir.report_incomplete)."""
    from megatron_swift.training import run_dir

    fake_checkpoint(tmp_path / "checkpoints", 3)
    (tmp_path / "checkpoints" / "iter_0000006").mkdir()  # empty
    partial = fake_checkpoint(tmp_path / "checkpoints", 9)
    (partial / ckpt_store.META).write_text('{"iteration": 9, "compl')  # torn record
    said = []
    run_dir.report_incomplete(str(tmp_path), said.append)
    assert len(said) == 2 and "iter_0000006 is not a complete checkpoint" in said[0] and "iter_0000009" in said[1]
    assert ckpt_store.find_checkpoint(str(tmp_path)).endswith("iter_0000003")
