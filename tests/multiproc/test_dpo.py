"""DPO on megatron-core: log 2 at the start under every layout, learns a learnable preference, reference frozen."""
from __future__ import annotations

import json
import math
import subprocess

import pytest

from tests.conftest import ROOT, launch_cmd, read_metrics, run_train, train_env
from tests.multiproc.test_hf_load import _save_tiny

transformers = pytest.importorskip("transformers")
WORKER = ROOT / "tests" / "multiproc" / "dpo_worker.py"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    _save_tiny("qwen3", folder, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    return folder


def _base(hf, out):
    # The bundled arithmetic preference set, byte tokenizer; the HF folder gives the starting weights.
    return ["+model=qwen3", f"model.pretrained={hf}", "data=prefs", "data.tokenizer=byte", "task=dpo",
            "train.seq_length=96", "train.precision=fp32", "train.device=cpu", "logging.tensorboard=false",
            f"train.output_dir={out}"]


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["parallel.tp=2"]), (2, ["parallel.pp=2"])])
def test_policy_equal_to_reference_gives_log_2(tmp_path, tiny_hf, nproc, layout):
    run_train(nproc, [*_base(tiny_hf, tmp_path / "run"), "train.train_iters=1", *layout])
    (first,) = read_metrics(tmp_path / "run")
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/accuracies"] == 0.0 and first["rewards/margins"] == 0.0


def test_dpo_learns_the_preference_and_leaves_the_reference_unchanged(tmp_path, tiny_hf):
    result = tmp_path / "result.json"
    overrides = [*_base(tiny_hf, tmp_path / "run"), "train.train_iters=30", "train.lr=1e-3", "train.max_epochs=null"]
    proc = subprocess.run(launch_cmd(2, [str(result), *overrides], script=WORKER), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = read_metrics(tmp_path / "run")
    late = [r["rewards/accuracies"] for r in rows[-5:]]
    assert sum(late) / len(late) > 0.9, late
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    checked = json.loads(result.read_text())
    assert checked["reference_unchanged"] and checked["reference_params"] > 0


def test_precomputed_reference_gives_the_same_run(tmp_path, tiny_hf):
    base = [*_base(tiny_hf, None)[:-1], "train.train_iters=3", "train.lr=1e-3"]
    live, pre = tmp_path / "live", tmp_path / "pre"
    run_train(2, [*base, f"train.output_dir={live}"])
    run_train(2, [*base, f"train.output_dir={pre}", "task.precompute_ref=true"])
    assert (pre / "ref_logps_train.pt").exists()
    for a, b in zip(read_metrics(live), read_metrics(pre)):
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            assert abs(a[key] - b[key]) < 1e-5, (a["iteration"], key, a[key], b[key])
