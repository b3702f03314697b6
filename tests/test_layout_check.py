"""Which layout changes a resume accepts (training/checkpoint.check_layout): only the split over data and context
parallel ranks; a source with a per-rank position (stream, rollouts) keeps its layout."""
import pytest

from megatron_swift.training import checkpoint
from megatron_swift.training.errors import CheckpointError

SAVED = {"world": 2, "tp": 1, "pp": 1, "ep": 1, "vpp": 1, "cp": 1, "etp": 1, "distributed_optimizer": True}


def _check(monkeypatch, now, stateful=False):
    monkeypatch.setattr(checkpoint, "_layout", lambda optimizer=None: dict(SAVED, **now))
    return checkpoint.check_layout("/ckpt/iter_1", {"layout": dict(SAVED)}, None, stateful)


def test_same_layout_and_another_cp_or_dp_split(monkeypatch):
    assert _check(monkeypatch, {}) is False
    assert _check(monkeypatch, {"cp": 2}) is True
    assert _check(monkeypatch, {"world": 4, "cp": 2}) is True
    assert _check(monkeypatch, {"world": 4}) is True


@pytest.mark.parametrize("now", [{"tp": 2}, {"pp": 2, "world": 4}, {"distributed_optimizer": False}, {"ep": 2}])
def test_other_changes_are_refused(monkeypatch, now):
    with pytest.raises(CheckpointError, match="a resume may change only parallel.cp and the number of data-parallel"):
        _check(monkeypatch, now)


def test_a_stream_keeps_its_layout(monkeypatch):
    with pytest.raises(CheckpointError, match="keeps a position per rank"):
        _check(monkeypatch, {"cp": 2}, stateful=True)
    assert _check(monkeypatch, {}, stateful=True) is False
