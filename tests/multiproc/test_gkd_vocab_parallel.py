"""GKD's divergence with the vocabulary split over two ranks equals the one on the gathered vocabulary, value and student gradient (tests/multiproc/gkd_worker.py)."""
from __future__ import annotations

import json
import subprocess

from tests.conftest import ROOT, launch_cmd, train_env

WORKER = ROOT / "tests" / "multiproc" / "gkd_worker.py"


def test_tp2_divergence_equals_the_gathered_one(tmp_path):
    result = tmp_path / "rows.json"
    proc = subprocess.run(launch_cmd(2, [str(result)], script=WORKER), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(result.read_text())
    assert len(rows) == 6
    for row in rows:
        assert row["loss"] > 0.1, row  # a real divergence
        assert row["loss_diff"] < 1e-6 and row["grad_diff"] < 1e-7, row
