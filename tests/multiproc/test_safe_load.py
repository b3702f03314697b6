"""Loading a checkpoint never runs code from it.

A checkpoint from a real 2-rank CPU run is copied and tampered with: a pickle that would
create a marker file goes into ``.metadata``, into a bytes item of a ``.distcp`` file (the
RNG state) or into ``common.pt``. The exporter (tools/convert/mcore_to_hf.py) and
``safe_load.load`` (what resuming and model.load use) must refuse each with one line naming
the file, and the marker must not exist. The untampered checkpoint must load through
``safe_load.load`` exactly as through megatron-core's own ``dist_checkpointing.load``.

This file is also the torchrun worker for the ``safe_load.load`` cases (``__main__`` below).
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a torchrun script, the repository is not on the path

CONVERT = ROOT / "tools" / "convert" / "mcore_to_hf.py"
CONFIG = ["+model=qwen3", "train.precision=fp32", "train.seq_length=64", "train.global_batch_size=4",
          "train.micro_batch_size=2", "parallel.distributed_optimizer=true", "logging.tensorboard=false",
          "train.device=cpu"]
ADVICE = "checkpoints from untrusted sources should be exchanged as HF safetensors"
# TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD makes a torch.load without an explicit weights_only unpickle everything
# (megatron-core's common.pt load is one): the safe loader must hold with it set.
UNSAFE_ENV = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


class _Payload:
    """Unpickles as a call to ``exec`` that creates ``marker``: what a crafted checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


# ------------------------------------------------------------------------------------------- crafting checkpoints

def _iter_dir(run: Path) -> Path:
    (found,) = sorted((run / "checkpoints").glob("iter_*"))
    return found


def _copy_run(run: Path, dest: Path) -> Path:
    """A copy of the run folder; returns the copy's iter_N folder, to tamper with."""
    shutil.copytree(run, dest)
    return _iter_dir(dest)


def _metadata(ckpt: Path):
    with open(ckpt / ".metadata", "rb") as f:
        return pickle.load(f)  # our own untampered file: the full unpickler is fine here


def _write_metadata(ckpt: Path, metadata) -> None:
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _reseal(ckpt: Path) -> None:
    """Update the manifest of megatron_swift.json (if it has one) to the tampered files: an attacker would."""
    meta_path = ckpt / "megatron_swift.json"
    meta = json.loads(meta_path.read_text())
    manifest = meta.get("manifest")
    if not isinstance(manifest, dict):
        return
    for name in manifest:
        data = (ckpt / name).read_bytes()
        manifest[name] = [len(data), hashlib.sha256(data).hexdigest()]
    meta_path.write_text(json.dumps(meta, indent=2))


def craft_metadata(ckpt: Path, marker: Path) -> None:
    """``.metadata`` still describing the checkpoint, with the payload in a field nothing reads."""
    metadata = _metadata(ckpt)
    metadata.storage_meta.modules = [_Payload(marker)]
    _write_metadata(ckpt, metadata)
    _reseal(ckpt)


def craft_bytes_item(ckpt: Path, marker: Path, key: str = "rng_state/shard_0_2") -> None:
    """Rank 0's RNG state (a bytes item) replaced by a torch.save of the payload, in a new .distcp file."""
    metadata = _metadata(ckpt)
    (index,) = [i for i in metadata.storage_data if i.fqn == key]
    data = io.BytesIO()
    import torch

    torch.save([_Payload(marker)], data)
    (ckpt / "__9_0.distcp").write_bytes(data.getvalue())
    info = metadata.storage_data[index]
    metadata.storage_data[index] = type(info)(relative_path="__9_0.distcp", offset=0, length=len(data.getvalue()))
    _write_metadata(ckpt, metadata)
    _reseal(ckpt)


def craft_common(ckpt: Path, marker: Path) -> None:
    """``common.pt`` with the payload next to the real scheduler state."""
    import torch

    common = torch.load(ckpt / "common.pt", weights_only=True)
    common["scheduler"]["payload"] = _Payload(marker)
    torch.save(common, ckpt / "common.pt")
    _reseal(ckpt)


# ------------------------------------------------------------------------------------------------------ the tests

def _train(run: Path) -> None:
    from tests.conftest import run_train

    run_train(2, [*CONFIG, "train.train_iters=2", f"train.output_dir={run}"], timeout=240)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run of 2 steps on 2 ranks (distributed optimizer), trained once for this module."""
    run = tmp_path_factory.mktemp("safe_load") / "run"
    _train(run)
    return run


def _export(ckpt: Path, out: Path) -> subprocess.CompletedProcess:
    from tests.conftest import train_env

    return subprocess.run([sys.executable, str(CONVERT), "--ckpt", str(ckpt), "--out", str(out)], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=240)


def _expect_refusal(message: str, path: Path) -> None:
    assert message.startswith(f"{path}: refusing to load: the file references builtins.exec, "), message
    assert message.endswith(ADVICE) and "\n" not in message, message


def test_exporter_refuses_crafted_metadata_without_running_it(run_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crafted")
    ckpt, marker = _copy_run(run_dir, tmp / "run"), tmp / "marker"
    craft_metadata(ckpt, marker)
    proc = _export(tmp / "run", tmp / "hf")
    assert not marker.exists(), "the crafted .metadata ran code"
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("megatron-swift: error: ")
    _expect_refusal(errors[0][len("megatron-swift: error: "):], ckpt / ".metadata")
    assert not (tmp / "hf").exists() and not (tmp / "hf.tmp").exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(run_dir, tmp_path_factory):
    from megatron_swift.training.safe_load import UnsafeCheckpointError, read_metadata_file

    ckpt = _copy_run(run_dir, tmp_path_factory.mktemp("outside") / "run")
    metadata = _metadata(ckpt)
    index = next(iter(metadata.storage_data))
    info = metadata.storage_data[index]
    metadata.storage_data[index] = type(info)(relative_path="../../secret.distcp", offset=0, length=info.length)
    _write_metadata(ckpt, metadata)
    with pytest.raises(UnsafeCheckpointError) as refused:
        read_metadata_file(str(ckpt / ".metadata"))
    assert str(refused.value).startswith(f"{ckpt / '.metadata'}: refusing to load: it names data file ")
    assert "../../secret.distcp" in str(refused.value) and str(refused.value).endswith(ADVICE)


def test_safe_load_refuses_crafted_files_and_loads_the_intact_checkpoint(run_dir, tmp_path_factory):
    from tests.conftest import launch_cmd, train_env

    tmp = tmp_path_factory.mktemp("cases")
    cases = {"intact": _iter_dir(run_dir)}
    for name, craft in (("metadata", craft_metadata), ("bytes_item", craft_bytes_item), ("common", craft_common)):
        cases[name] = _copy_run(run_dir, tmp / name)
        craft(cases[name], tmp / f"{name}.marker")
    spec = tmp / "cases.json"
    spec.write_text(json.dumps({name: str(path) for name, path in cases.items()}))
    proc = subprocess.run(launch_cmd(2, [str(spec), str(tmp / "result"), *CONFIG, f"train.output_dir={tmp / 'w'}"],
                                     script=Path(__file__)),
                          cwd=ROOT, env=dict(train_env(), **UNSAFE_ENV), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name in ("metadata", "bytes_item", "common"):
        assert not (tmp / f"{name}.marker").exists(), f"the crafted {name} ran code"
    files = {"metadata": cases["metadata"] / ".metadata", "bytes_item": cases["bytes_item"] / "__9_0.distcp",
             "common": cases["common"] / "common.pt"}
    for rank in (0, 1):
        result = json.loads((tmp / f"result.{rank}.json").read_text())
        assert not result["intact"]["differ"] and result["intact"]["compared"] > 20, result["intact"]
        for name, path in files.items():
            assert result[name]["type"] == "UnsafeCheckpointError", (name, result[name])
            message = result[name]["message"]
            if name == "bytes_item":  # the file, then the item in it: rank 0's RNG state
                assert message.startswith(f"{path} (item rng_state/shard_0_2): refusing to load: "), message
                message = message.replace(" (item rng_state/shard_0_2)", "")
            _expect_refusal(message, path)


# ------------------------------------------------------------------------------------------------------ the worker

def _snapshot(value):
    """A deep copy of a loaded state: tensors cloned (the loader fills the model's own tensors in place)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return pickle.loads(pickle.dumps(value))  # our own trusted objects (numpy arrays, ints, ...)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _compare(a, b, path: str = "") -> tuple:
    """(leaves compared, paths of those that differ): tensors and arrays bitwise, dtypes included."""
    import numpy as np
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if a.get("padding") is True and b.get("padding") is True:
            return 0, []  # bucket padding: undefined contents (see _checkpoint_only)
        if sorted(map(str, a)) != sorted(map(str, b)):
            return 1, [f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"]
        parts = [_compare(a[k], b[k], f"{path}/{k}") for k in a]
    elif isinstance(a, (list, tuple)) and type(a) is type(b) and len(a) == len(b):
        parts = [_compare(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    else:
        if isinstance(a, torch.Tensor):
            same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        elif isinstance(a, np.ndarray):
            same = isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
        else:
            same = type(a) is type(b) and a == b
        return 1, [] if same else [f"{path}: {_short(a)} vs {_short(b)}"]
    return sum(n for n, _ in parts), [d for _, diffs in parts for d in diffs]


def _checkpoint_only(sharded) -> dict:
    """``sharded`` without what loading takes from the live objects instead of the checkpoint.

    LocalNonpersistentObjects (e.g. the distributed optimizer's per-bucket ``step``) are passed
    through from the template, which for a fresh Adam holds uninitialised memory: they would
    differ between any two loads. The ``padding`` flags stay: megatron-core 0.16's dp_reshardable
    format stores the gaps between parameters in a bucket as ``torch.empty`` tensors (saved and loaded as
    such), whose contents are undefined, so the comparison skips the entries flagged as padding."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

    return dict_list_map_inplace(
        lambda x: LocalNonpersistentObject(x.obj if isinstance(x.obj, bool) else None)
        if isinstance(x, LocalNonpersistentObject) else x, sharded)


def _poison(sharded) -> None:
    """NaN (or -1) into every tensor a load fills, so that one the second loader missed cannot match."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    with torch.no_grad():
        for item in nested_values(sharded):
            if isinstance(item, ShardedTensor) and item.data is not None:
                item.data.fill_(float("nan") if item.data.is_floating_point() else -1)


def _attempt(fn) -> dict:
    try:
        fn()
    except Exception as e:  # the outcome is the result: the test checks the type and the message
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": ""}


def _worker(spec_file: str, result_prefix: str, overrides) -> None:
    """Load every case's checkpoint into a freshly set-up trainer's full resume state; write each outcome."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_swift.config.compose import compose
    from megatron_swift.training import checkpoint, safe_load
    from megatron_swift.training.loop import setup

    cases = json.loads(Path(spec_file).read_text())
    trainer = setup(compose(overrides))

    def state():  # what resuming loads: model, optimizer, scheduler, RNG
        return _checkpoint_only(checkpoint._full_sharded_state(trainer.model, trainer.optimizer, trainer.scheduler,
                                                               True))

    expected = _snapshot(dist_checkpointing.load(state(), cases["intact"]))
    sharded = state()
    _poison(sharded)
    compared, differ = _compare(expected, safe_load.load(sharded, cases["intact"]))
    result = {"intact": {"compared": compared, "differ": differ[:10]}}
    for name in ("metadata", "bytes_item", "common"):
        result[name] = _attempt(lambda: safe_load.load(state(), cases[name]))
    with open(f"{result_prefix}.{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":  # the torchrun worker: <cases.json> <result prefix> <overrides...>
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
