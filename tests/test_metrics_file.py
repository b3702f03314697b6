"""After a resume, metrics.jsonl holds one row per step: the rows of redone steps move to metrics.redone.jsonl."""
from __future__ import annotations

import json

from megatron_swift.observe.metrics_file import open_metrics


def test_rows_of_steps_after_the_resume_point_move_out_before_the_run_appends(tmp_path):
    rows = [{"iteration": i, "loss": 1.0 / i} for i in range(1, 9)] + [{"iteration": 4, "eval_loss": 0.5},
                                                                       {"iteration": 8, "eval_loss": 0.4}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 9, "lo'  # cut off by the kill
    (tmp_path / "metrics.jsonl").write_text(text)
    with open_metrics(str(tmp_path), resumed_at=6) as f:
        f.write(json.dumps({"iteration": 7, "loss": 0.0}) + "\n")
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iteration"], "eval_loss" in r) for r in kept] == [(i, False) for i in range(1, 7)] + \
        [(4, True), (7, False)]
    redone = (tmp_path / "metrics.redone.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in redone[:3]] == [dict(r, redone=True) for r in (rows[6], rows[7], rows[9])]
    assert redone[3] == '{"iteration": 9, "lo'
    with open_metrics(str(tmp_path), resumed_at=7):  # nothing after step 7: nothing moves
        pass
    assert len((tmp_path / "metrics.redone.jsonl").read_text().splitlines()) == 4
