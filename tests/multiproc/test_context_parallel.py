"""Ulysses context parallelism (parallel.cp_comm=a2a): the exchange itself against full attention.
Training with cp=2 against cp=1 is in test_layout_parity.py; packed rows with cp=2 in test_sft_packing.py."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, launch_cmd, train_env

WORKER = ROOT / "tests" / "multiproc" / "ulysses_worker.py"


@pytest.mark.parametrize("groups", [2, 1], ids=["kv-split", "kv-repeated"])
def test_ulysses_attention_and_gradients_equal_full_attention(tmp_path, groups):
    out = tmp_path / "result.json"
    proc = subprocess.run(launch_cmd(2, [str(out), str(groups)], script=WORKER), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    for mask, errors in result.items():
        assert errors["grad_scale"] > 0.1  # gradients of a real size flowed
        for name, err in errors.items():
            if name != "grad_scale":
                assert err < 1e-5, f"{mask}: {name} differs by {err}"
