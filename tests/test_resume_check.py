"""What a resume compares: which changed settings are refused (they move the data position or change the
model) and which are applied (the schedule), each named with its old and new value."""
from __future__ import annotations

import json

from megatron_swift.config.compose import compose
from megatron_swift.config.validate import validate
from megatron_swift.training import resume_check


def settings(*overrides):
    cfg = compose(["+model=qwen3", *overrides])
    return resume_check.settings(cfg, validate(cfg, 2))


def test_a_data_order_setting_or_the_architecture_is_refused_by_name():
    saved = json.loads(json.dumps(settings("train.seq_length=128")))  # as a checkpoint stores it
    refused, applied = resume_check.compare(saved, settings("train.seq_length=64", "model.num_layers=4"))
    assert refused == ["train.seq_length: 128 -> 64", "model.num_layers: 2 -> 4"] and applied == []


def test_schedule_changes_are_applied_and_reported():
    saved = settings()
    refused, applied = resume_check.compare(saved, settings("train.lr=1e-3", "train.train_iters=50"))
    assert refused == []
    assert applied == ["train.lr: 0.0003 -> 0.001", "train.train_iters: None -> 50"]


def test_data_file_contents_are_fingerprinted(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "one"}\n' * 1000)
    saved = settings(f"data.path={data}")
    assert resume_check.compare(saved, settings(f"data.path={data}")) == ([], [])
    text = data.read_text()
    data.write_text(text[:5000] + text[5000:].replace("one", "two", 1))  # same size, one word changed
    refused, _ = resume_check.compare(saved, settings(f"data.path={data}"))
    assert refused == [f"data file {data}: contents changed"]


def test_the_identity_of_a_command_includes_its_layout():
    cfg = compose(["+model=qwen3"])
    now = settings()
    one = resume_check.identity(cfg, now, world=2)
    two = resume_check.identity(compose(["+model=qwen3", "parallel.tp=2"]), now, world=2)
    assert one != two and one == resume_check.identity(cfg, settings(), world=2)


def test_a_changed_global_batch_is_refused_naming_it():
    """The data position is a function of the step and the global batch: a new global batch would skip or repeat
    samples (the multi-process test of the same takes a minute; this one a second)."""
    saved = json.loads(json.dumps(settings("train.global_batch_size=8")))
    refused, applied = resume_check.compare(saved, settings("train.global_batch_size=16"))
    assert refused == ["train.global_batch_size: 8 -> 16"] and applied == []
    message = resume_check.refusal_message("/run/checkpoints/iter_0000009", refused)
    assert "train.global_batch_size: 8 -> 16" in message and "model.load=/run/checkpoints/iter_0000009" in message


def test_the_identity_of_a_command_covers_every_setting_but_where_it_writes():
    """train.resume=auto in the default folder continues only the same command: another lr is another run."""
    def ident(*overrides):
        cfg = compose(["+model=qwen3", *overrides])
        return resume_check.identity(cfg, resume_check.settings(cfg, validate(cfg, 2)), world=2)

    same = ident()
    assert ident("train.lr=1e-3") != same and ident("logging.log_interval=5") != same
    assert ident("train.output_dir=/elsewhere", "train.resume=auto") == same == json.loads(json.dumps(same))


def test_a_same_size_edit_anywhere_in_a_large_file_is_caught_and_an_unchanged_file_read_once(tmp_path, monkeypatch):
    """Every byte counts (a fingerprint of the first and last MiB let a same-size edit in the middle through),
    and a file whose inode, size, mtime and ctime are unchanged is not read again (cost: one stat)."""
    import os

    from megatron_swift.training import fingerprint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "big.jsonl"
    data.write_text('{"text": "one"}\n' * 300_000)  # 4.8 MB
    reads = []
    monkeypatch.setattr(fingerprint, "hash_file", lambda p, real=fingerprint.hash_file: reads.append(p) or real(p))
    saved = settings(f"data.path={data}")
    assert resume_check.compare(saved, settings(f"data.path={data}")) == ([], []) and len(reads) == 1
    before = os.stat(data)
    text = data.read_text()
    middle = len(text) // 2
    data.write_text(text[:middle] + text[middle:].replace("one", "two", 1))  # same size, one word changed
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the modification time put back
    refused, _ = resume_check.compare(saved, settings(f"data.path={data}"))
    assert refused == [f"data file {data}: contents changed"] and len(reads) == 2


def test_a_vlm_parts_learning_rate_is_applied_but_its_group_cannot_appear_or_go():
    """train.vision_lr / projector_lr: a new value is applied from the resume step like train.lr; setting one that
    was unset (or the reverse) would add or remove an optimizer parameter group: refused, naming the key."""
    def vlm(*overrides):
        cfg = compose(["+model=qwen2_5_vl", "model.size=tiny", "train.train_vision=true", *overrides])
        return json.loads(json.dumps(resume_check.settings(cfg, validate(cfg, 1))))

    saved = vlm("train.vision_lr=1e-5")
    refused, applied = resume_check.compare(saved, vlm("train.vision_lr=2e-5"))
    assert refused == [] and applied == ["train.vision_lr: 1e-05 -> 2e-05"]
    refused, applied = resume_check.compare(saved, vlm("train.projector_lr=1e-4"))
    assert applied == [] and refused == [
        "train.projector_lr: None -> 0.0001 (adds an optimizer parameter group the checkpoint has no state for)",
        "train.vision_lr: 1e-05 -> None (removes an optimizer parameter group the checkpoint has state for)"]
