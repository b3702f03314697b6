"""The layout planner's weight, gradient and optimizer bytes are what the trainer allocates (within 2 %)."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT, launch_cmd, train_env

WORKER = ROOT / "tests" / "multiproc" / "plan_worker.py"
# Big enough that megatron-core's bucket padding is well under the tolerance.
DENSE = ["+model=qwen3", "model.hidden_size=256", "model.ffn_hidden_size=768", "model.num_layers=4",
         "model.num_attention_heads=8", "model.num_query_groups=4", "model.kv_channels=32"]
MOE = ["+model=qwen3_moe", "model.hidden_size=256", "model.moe_ffn_hidden_size=256", "model.num_layers=2",
       "model.num_attention_heads=8", "model.num_query_groups=4", "model.kv_channels=32"]
VLM = ["+model=llava", "model.hidden_size=256", "model.ffn_hidden_size=768", "model.num_layers=4",
       "model.num_attention_heads=8", "model.num_query_groups=4"]
CASES = {
    "tp2-fp32": (DENSE, ["parallel.tp=2", "train.precision=fp32"]),
    "pp2-fp32": (DENSE, ["parallel.pp=2", "train.precision=fp32"]),
    "dp2-bf16-distopt": (DENSE, ["train.precision=bf16", "parallel.distributed_optimizer=true"]),
    "ep2-fp32": (MOE, ["parallel.ep=2", "train.precision=fp32"]),
    # The distributed optimizer shards over the DP x CP group (here DP=1, CP=2).
    "cp2-bf16-distopt": (DENSE, ["train.precision=bf16", "parallel.distributed_optimizer=true", "parallel.cp=2"]),
    # A VLM: the first stage also holds the vision encoder (frozen by default: no gradients or Adam state)
    # and the projector.
    "llava-tp2-fp32": (VLM, ["parallel.tp=2", "train.precision=fp32"]),
    "llava-pp2-train-vision-distopt": (VLM, ["parallel.pp=2", "train.precision=bf16", "train.train_vision=true",
                                             "parallel.distributed_optimizer=true"]),
    # A tower held whole on each TP rank (transformers' Qwen2.5-VL ViT), training, eager attention: built without
    # a folder, on the bundled 56 x 56 images (data.max_pixels = 56^2: the planner's largest image is theirs,
    # so its count of the tower's saved activations is exact).
    "qwen2_5_vl-tp2-train-vision-eager": (["+model=qwen2_5_vl", "model.size=tiny", "data=vl_sft"],
                                          ["parallel.tp=2", "train.precision=fp32", "train.train_vision=true",
                                           "model.attention_backend=local", "data.max_pixels=3136",
                                           "train.seq_length=96"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_planned_bytes_match_the_allocation(tmp_path, case):
    model, layout = CASES[case]
    result = tmp_path / "rows.json"
    common = ["train.device=cpu", "train.train_iters=1", "train.seq_length=32", "train.global_batch_size=4",
              "train.micro_batch_size=1", "train.save_at_end=false", "logging.tensorboard=false",
              f"train.output_dir={tmp_path / 'run'}"]
    mine = {o.split("=")[0] for o in layout}  # a case's own value replaces the common one
    overrides = [*model, *layout, *(o for o in common if o.split("=")[0] not in mine)]
    proc = subprocess.run(launch_cmd(2, [str(result), *overrides], script=WORKER), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(result.read_text())
    if "qwen2_5_vl" in case:  # every TP rank of the first stage holds the tower and its activations
        assert all(row["measured"].get("tower_activations", 0) > 0 for row in rows if row["stage"] == 0), rows
    for row in rows:
        measured, planned = row["measured"], row["planned"]
        assert measured["params"] == planned["params"], row  # the parameter count is exact
        for key in ("weights", "grads", "optimizer", "tower_activations"):
            if key not in measured:
                continue
            assert abs(planned[key] - measured[key]) <= 0.02 * measured[key], (case, row["rank"], key, row)
