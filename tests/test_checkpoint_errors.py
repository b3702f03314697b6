"""A damaged checkpoint is a CheckpointError naming it, whatever the reader trips on (DCP's own
CheckpointException derives from BaseException, not Exception), and a record that lists no files is not
taken for an intact one."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_swift.training import checkpoint, ckpt_store
from megatron_swift.training.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("world_of_one")  # tests/conftest.py


def weights(fill: float = 0.0) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", torch.full((8, 8), fill + i)) for i in range(2)}


def saved(tmp_path) -> str:
    return checkpoint._write(str(tmp_path), 3, lambda: weights(1.0), "x: 1\n", {"iteration": 3}, keep_last=2)


def test_a_missing_shard_is_a_checkpoint_error_naming_the_checkpoint(tmp_path):
    ckpt = saved(tmp_path)
    target = weights()
    assert torch.equal(checkpoint._dcp_load(target, ckpt)["w1"], torch.full((8, 8), 2.0))
    for shard in (tmp_path / "checkpoints" / "iter_0000003").glob("*.distcp"):
        shard.unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint {ckpt} cannot be loaded: .*No such file") as caught:
        checkpoint._dcp_load(weights(), ckpt)
    assert "\n" not in str(caught.value)


def test_a_record_without_a_manifest_is_not_intact(tmp_path):
    ckpt = saved(tmp_path)
    assert ckpt_store.verify(ckpt) == []
    record = json.loads((tmp_path / "checkpoints" / "iter_0000003" / ckpt_store.META).read_text())
    for manifest in (None, "x", {"a": 1}):  # gone, or not a {file: [size, sha256]} listing
        if manifest is None:
            record.pop("manifest", None)
        else:
            record["manifest"] = manifest
        (tmp_path / "checkpoints" / "iter_0000003" / ckpt_store.META).write_text(json.dumps(record))
        problems = ckpt_store.verify(ckpt)
        assert len(problems) == 1 and "manifest" in problems[0], problems
