"""Bad input ends with one clear message and a non-zero exit, before any checkpoint is touched."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

from tests.conftest import ROOT, TRAIN, launch_cmd, train_env


def _train(args, nproc=None, cwd=ROOT):
    cmd = launch_cmd(nproc, args) if nproc else [sys.executable, str(TRAIN), *args]
    return subprocess.run(cmd, cwd=cwd, env=train_env(), capture_output=True, text=True, timeout=240)


def _tree_digest(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def test_no_model_lists_the_families(tmp_path):
    """As typed: no +model= and no train.output_dir (the default run folder needs the model's name)."""
    proc = _train([], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("megatron-swift: error: no model chosen: add +model=<family>, one of: deepseek, "
                                   "glm4_moe, internvl, llama, llava, mimo, mixtral, olmo2, phi3, qwen2, qwen2_5_vl, "
                                   "qwen2_moe, qwen3, qwen3_moe, qwen3_vl, qwen3_vl_moe")
    assert not (tmp_path / "outputs").exists()


def test_unknown_model_names_the_choices():
    proc = _train(["+model=gpt5"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("megatron-swift: error: model=gpt5: no such model; choose one of: deepseek, "
                                   "glm4_moe, internvl, llama, llava, mimo, mixtral, olmo2, phi3, qwen2, qwen2_5_vl, "
                                   "qwen2_moe, qwen3, qwen3_moe, qwen3_vl, qwen3_vl_moe")


def test_a_misspelt_key_or_another_tasks_setting_is_one_line():
    proc = _train(["+model=qwen3", "train.lrr=1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("megatron-swift: error: train.lrr: no such setting (did you mean train.lr? the "
                                   "settings and their documentation: launch/train.py --help)")
    proc = _train(["+model=qwen3", "task.beta=0.2"])  # beta is a DPO/KTO setting; the task is lm
    assert proc.returncode == 2
    assert proc.stderr.strip() == "megatron-swift: error: task.beta: task=lm has no such setting (its settings: name)"


def test_unknown_size_lists_sizes():
    proc = _train(["+model=qwen3", "model.size=3t"])
    assert proc.returncode == 2
    assert "model.size=3t is not a size of family qwen3" in proc.stderr and "8b" in proc.stderr


def test_layout_that_does_not_divide(tmp_path):
    proc = _train(["+model=qwen3", "parallel.tp=3", f"train.output_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2
    assert "parallel.tp=3 does not divide model.num_attention_heads=4" in proc.stderr
    assert "parallel.tp=3 does not divide model.num_query_groups=2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = _train(["+model=qwen3", f"data.path=[{missing}]", f"train.output_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2
    assert f"data file not found: {missing} (data.path)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_malformed_jsonl_names_file_and_line_and_keeps_checkpoints(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken\n{"text": "never read"}\n')
    out = tmp_path / "out"
    # A previous run's checkpoint in the run directory: it must come through untouched.
    ckpt = out / "checkpoints" / "iter_0000005"
    ckpt.mkdir(parents=True)
    (ckpt / "common.pt").write_bytes(b"weights")
    manifest = {"common.pt": [7, hashlib.sha256(b"weights").hexdigest()]}  # a record without one is not intact
    (ckpt / "megatron_swift.json").write_text(json.dumps({"iteration": 5, "manifest": manifest}))
    before = _tree_digest(out)
    proc = _train(["+model=qwen3", f"data.path=[{data}]", f"train.output_dir={out}"])
    assert proc.returncode == 2
    assert f"{data}:3: invalid JSON" in proc.stderr
    assert _tree_digest(out) == before


def test_row_without_text_field(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "ok"}\n\n{"content": "wrong key"}\n')
    proc = _train(["+model=qwen3", f"data.path=[{data}]", f"train.output_dir={tmp_path / 'out'}"])
    assert proc.returncode == 2
    assert f"{data}:3: row has no string field 'text' (set data.text_key)" in proc.stderr


def test_world_size_that_does_not_match_layout(tmp_path):
    proc = _train(["+model=qwen3", "parallel.tp=2", "parallel.pp=2", "train.device=cpu",
                   f"train.output_dir={tmp_path / 'out'}"], nproc=2)
    assert proc.returncode != 0
    assert "world size 2 is not divisible by parallel.tp*pp*cp=2*2*1" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "iter_0000003").mkdir(parents=True)
    (out / "checkpoints" / "iter_0000003" / "megatron_swift.json").write_text('{"iteration": 3}')
    before = _tree_digest(out)
    proc = _train(["+model=qwen3", "train.resume=none", f"train.output_dir={out}"])
    assert proc.returncode == 2
    assert "already holds checkpoints (iter_0000003)" in proc.stderr
    assert _tree_digest(out) == before
