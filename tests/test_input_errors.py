"""Input people get wrong in practice ends in one clear line (exit 2), or just works.

A single path where a list is expected, bytes that are not UTF-8, a line far too
long to hold, fewer samples than one global batch, WandB without a login, and
launch/slurm.py on a machine without sbatch. The command-line cases run the
real entry points; the readers are also checked in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from megatron_swift.config.compose import compose, list_keys
from megatron_swift.config.validate import ConfigError, validate
from megatron_swift.data.errors import DataError
from megatron_swift.data.files import jsonl_lines
from megatron_swift.data.sft import Counts
from megatron_swift.data.sources import jsonl_source
from megatron_swift.data.tokenizer import ByteTokenizer
from megatron_swift.observe.wandb_login import wandb_login_problem
from megatron_swift.training import run_length
from tests.conftest import ROOT, TRAIN, train_env

SLURM = ROOT / "launch" / "slurm.py"
BAD_BYTE = b'{"text": "caf\xe9"}\n'  # Latin-1 e-acute: not UTF-8; the byte is at column 14


def _run(script, args, env=None):
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env or train_env(),
                          capture_output=True, text=True, timeout=240)


def _error_line(proc) -> str:
    """The one ``megatron-swift: error:`` line of a run that stopped on bad input (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if "megatron-swift: error:" in line]
    assert len(lines) == 1, proc.stderr[-4000:]
    return lines[0]


def _qa(q: str, a: str) -> bytes:
    return (json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n").encode()


def _text(t: str) -> bytes:
    return (json.dumps({"text": t}) + "\n").encode()


# -- 1. a single value for a list-typed key -------------------------------------------------------------


def test_every_list_key_of_the_schema_takes_a_single_value():
    assert {"data.path", "data.eval_path", "data.weights", "train.freeze", "tuner.target_modules",
            "tuner.modules_to_save", "logging.wandb.tags", "cluster.container_mounts",
            "cluster.sbatch_extra"} <= list_keys()
    cfg = compose(["+model=qwen3", "data.path=a.jsonl", "data.eval_path=/d/e v.jsonl", "data.weights=0.5",
                   "train.freeze=embedding", "tuner.target_modules=linear_qkv", "tuner.modules_to_save=output_layer",
                   "logging.wandb.tags=ci", "cluster.container_mounts=/a:/b", "cluster.sbatch_extra=--mem=0",
                   "model.new_tokens=think", "model.new_token_init_text=a thought"])
    got = {key: OmegaConf.to_container(OmegaConf.select(cfg, key)) for key in list_keys()}
    assert got == {"data.path": ["a.jsonl"], "data.eval_path": ["/d/e v.jsonl"], "data.weights": [0.5],
                   "train.freeze": ["embedding"], "tuner.target_modules": ["linear_qkv"],
                   "tuner.modules_to_save": ["output_layer"], "logging.wandb.tags": ["ci"],
                   "cluster.container_mounts": ["/a:/b"], "cluster.sbatch_extra": ["--mem=0"],
                   "model.new_tokens": ["think"], "model.new_token_init_text": ["a thought"]}
    # Commas separate entries; brackets, an empty value and regexes are as before.
    cfg = compose(["+model=qwen3", "data.path=a.jsonl,b.jsonl", "data.weights=[0.7,0.3]", "train.freeze=",
                   r"train.freeze_regex=^decoder\.layers\.(0|1)\."])
    assert list(cfg.data.path) == ["a.jsonl", "b.jsonl"] and list(cfg.data.weights) == [0.7, 0.3]
    assert list(cfg.train.freeze) == [] and cfg.train.freeze_regex == r"^decoder\.layers\.(0|1)\."


def test_single_data_path_trains_like_a_bracketed_one(tmp_path, tiny_corpus):
    out = tmp_path / "out"
    rest = ["data=jsonl", "train.train_iters=1", "train.save_at_end=false", "train.save_at_epoch_end=false",
            "logging.tensorboard=false", f"train.output_dir={out}"]
    proc = _run(TRAIN, ["+model=qwen3", f"data.path={tiny_corpus}", *rest])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "metrics.jsonl").is_file()
    # The run trained on the config the bracketed command composes.
    ran = OmegaConf.load(out / "config.yaml")
    bracketed = compose(["+model=qwen3", f"data.path=[{tiny_corpus}]", *rest])
    assert list(ran.data.path) == [str(tiny_corpus)]
    assert OmegaConf.to_container(ran.data) == OmegaConf.to_container(bracketed.data)
    assert OmegaConf.to_container(ran.train) == OmegaConf.to_container(bracketed.train)


# -- 2. bytes that are not UTF-8 --------------------------------------------------------------------------


def test_sft_line_not_utf8_names_file_line_and_byte(tmp_path):
    data = tmp_path / "conv.jsonl"
    data.write_bytes(_qa("1+1?", "2") + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    proc = _run(TRAIN, ["+model=qwen3", "data=sft", f"data.path=[{data}]", f"train.output_dir={tmp_path / 'out'}"])
    line = _error_line(proc)
    assert f"{data}:2: not valid UTF-8 (byte 0xe9 at column 47)" in line and "data.on_error=skip" in line


def test_text_rows_not_utf8_are_skipped_and_counted(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_bytes(_text("good") + BAD_BYTE + _text("also good"))
    with pytest.raises(DataError, match=rf"{data}:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        jsonl_source([str(data)], "text", ByteTokenizer(), 4)
    skipped = jsonl_source([str(data)], "text", ByteTokenizer(), 4, on_error="skip")
    tok = ByteTokenizer()
    assert skipped.stream.tolist() == tok.encode("good") + [tok.eod] + tok.encode("also good") + [tok.eod]
    assert "3 rows, 1 bad rows skipped" in skipped.description


def test_preference_rows_not_utf8_are_skipped_and_counted(tmp_path):
    from megatron_swift.data.preference import preference_source

    data = tmp_path / "p.jsonl"
    pair = (json.dumps({"prompt": "Q", "chosen": "good", "rejected": "bad"}) + "\n").encode()
    data.write_bytes(pair + b'{"prompt": "\xff"}\n' + pair)
    cfg = SimpleNamespace(template="plain", on_error="skip", truncation="error", max_line_bytes=1024)
    pairs = preference_source([str(data)], cfg, ByteTokenizer(), 64, None)
    assert len(pairs) == 2 and "3 rows" in pairs.description and "1 bad rows skipped" in pairs.description


def test_sft_rows_not_utf8_or_too_long_are_skipped_and_counted(tmp_path):
    """Needs sft.read_conversations to pass data.max_line_bytes / data.on_error to jsonl_lines."""
    from megatron_swift.data.sft import sft_source

    data = tmp_path / "c.jsonl"
    data.write_bytes(_qa("1+1?", "2") + b'{"messages": "\xff"}\n' + _qa("x" * 3000, "y") + _qa("2+2?", "4"))
    cfg = SimpleNamespace(format="auto", loss_on="assistant", truncation="error", on_error="skip", packing=False,
                          template=None, weights=[], max_line_bytes=1024)
    rows = sft_source([str(data)], cfg, ByteTokenizer(), 64, "plain", None)
    assert len(rows) == 2 and "(4 rows," in rows.description and "2 bad rows skipped" in rows.description


def test_preprocess_line_not_utf8_names_file_and_line(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from preprocess_data import preprocess

    data = tmp_path / "p.jsonl"
    data.write_bytes(_text("ok") + BAD_BYTE)
    with pytest.raises(SystemExit, match=rf"{data}:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        preprocess([str(data)], str(tmp_path / "corpus"), "byte", workers=1)
    data.write_bytes(_text("ok") + _text("x" * 5000))
    with pytest.raises(SystemExit, match=rf"{data}:2: line is longer than --max-line-bytes=1024"):
        preprocess([str(data)], str(tmp_path / "corpus"), "byte", workers=1, max_line_bytes=1024)
    assert not list(tmp_path.glob("corpus*"))


# -- 3. a line longer than data.max_line_bytes -------------------------------------------------------------


def test_line_over_the_cap_names_file_line_and_key(tmp_path):
    from megatron_swift.data.sources import build_source

    data = tmp_path / "long.jsonl"
    data.write_bytes(_text("ok") + _text("x" * 5000) + _text("fine"))
    cfg = compose(["+model=qwen3", "data=jsonl", f"data.path={data}", "data.max_line_bytes=1024"]).data
    with pytest.raises(DataError) as e:
        build_source(cfg, cfg.path, ByteTokenizer(), 16, 0)
    assert str(e.value).startswith(f"{data}:2: line is longer than data.max_line_bytes=1024 bytes")
    assert "raise data.max_line_bytes" in str(e.value) and "data.on_error=skip" in str(e.value)
    cfg.on_error = "skip"
    assert "3 rows, 1 bad rows skipped" in build_source(cfg, cfg.path, ByteTokenizer(), 16, 0).description


def test_skipping_an_over_long_line_never_holds_it(tmp_path):
    data = tmp_path / "huge.jsonl"
    with open(data, "wb") as f:
        f.write(_text("before"))
        f.write(b'{"text": "' + b"x" * (8 * 2**20) + b'"}\n')  # 8 MiB, no newline until its end
        f.write(_text("after"))
    counts = Counts()
    tracemalloc.start()
    try:
        lines = [(n, line) for _, n, line in jsonl_lines([str(data)], 1024, "skip", counts)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [n for n, _ in lines] == [1, 3] and json.loads(lines[1][1]) == {"text": "after"}
    assert counts.rows == 1 and counts.skipped == 1
    assert peak < 2**20, f"peak {peak} bytes while skipping an 8 MiB line"


def test_stream_reader_skips_bad_lines_and_resumes_after_them(tmp_path):
    from megatron_swift.data.sft import line_encoder
    from megatron_swift.data.streaming import StreamingRows
    from megatron_swift.data.templates import load_template

    data = tmp_path / "s.jsonl"
    data.write_bytes(_qa("q1", "a1") + b"\xff\n" + _qa("q2", "x" * 3000) + _qa("q3", "a3") + _qa("q4", "a4"))
    cfg = SimpleNamespace(format="auto", loss_on="assistant", truncation="error", on_error="skip")
    tok = ByteTokenizer()

    def stream(on_error):
        encode = line_encoder(cfg, load_template("plain", None), tok, 96, Counts())
        return StreamingRows([str(data)], encode, 96, tok.pad, False, 0, 1, 0, 1, 1, max_line_bytes=1024,
                             on_error=on_error)

    def question(row):
        return bytes(t for t in row["tokens"].tolist() if t < 256).split(b"\n<|assistant|>")[0]

    with pytest.raises(DataError, match=rf"{data}:2: not valid UTF-8"):
        stream("error").next_rows(2)
    a = stream("skip")
    assert [question(r) for r in a.next_rows(2)] == [b"<|user|>\nq1", b"<|user|>\nq3"]
    b = stream("skip")
    b.restore(a.state())  # the reader's byte offset is past the skipped lines
    assert [question(r) for r in b.next_rows(2)] == [b"<|user|>\nq4", b"<|user|>\nq1"]


# -- 4. fewer samples than one global batch ------------------------------------------------------------------


def test_fewer_samples_than_the_global_batch(tmp_path):
    data = tmp_path / "three.jsonl"
    data.write_bytes(_qa("1+1?", "2") + _qa("2+2?", "4") + _qa("3+3?", "6"))
    proc = _run(TRAIN, ["+model=qwen3", "data=sft", f"data.path=[{data}]", "train.global_batch_size=8",
                        "train.max_epochs=1", f"train.output_dir={tmp_path / 'out'}"])
    line = _error_line(proc)
    assert "3 training samples, fewer than train.global_batch_size=8" in line
    assert "lower train.global_batch_size" in line and "add data (data.path)" in line
    with pytest.raises(DataError, match=rf"^{data}: 3 training samples, fewer than train.global_batch_size=8"):
        run_length.plan(3, 8, 1, None, data=[str(data)])


# -- 5. WandB without a login ----------------------------------------------------------------------------------


def _no_wandb_login(home) -> dict:
    env = {k: v for k, v in train_env().items()
           if k not in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_CONFIG_DIR", "WANDB_BASE_URL")}
    home.mkdir(exist_ok=True)
    return dict(env, HOME=str(home))


def test_wandb_without_a_key_stops_before_any_work(tmp_path):
    out = tmp_path / "out"
    proc = _run(TRAIN, ["+model=qwen3", "logging.wandb.project=x", f"train.output_dir={out}"],
                env=_no_wandb_login(tmp_path / "home"))
    line = _error_line(proc)
    assert "logging.wandb.project=x needs a WandB API key" in line
    assert "`wandb login`" in line and "WANDB_API_KEY" in line and "logging.wandb.mode=offline" in line
    assert not out.exists()


def test_wandb_key_found_where_wandb_looks(tmp_path, monkeypatch):
    wb = SimpleNamespace(project="x", mode="online")
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_CONFIG_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert "wandb login" in wandb_login_problem(wb)
    assert wandb_login_problem(SimpleNamespace(project="x", mode="offline")) is None
    assert wandb_login_problem(SimpleNamespace(project=None, mode="online")) is None
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k3y\n")
    assert wandb_login_problem(wb) is None
    (tmp_path / ".netrc").write_text("machine example.com\n  login user\n  password other\n")
    assert wandb_login_problem(wb) is not None
    monkeypatch.setenv("WANDB_BASE_URL", "https://example.com")
    assert wandb_login_problem(wb) is None
    monkeypatch.delenv("WANDB_BASE_URL")
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    assert wandb_login_problem(wb) is None


# -- 6. launch/slurm.py without sbatch ---------------------------------------------------------------------------


def test_slurm_without_sbatch_says_so_and_writes_nothing(tmp_path):
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "sbatch")))
    out = tmp_path / "run"
    proc = _run(SLURM, ["+model=qwen3", "cluster=slurm", "cluster.nodes=1", "cluster.gpus_per_node=2",
                        "cluster.dry_run=false", "train.max_epochs=1", f"train.output_dir={out}"],
                env=dict(train_env(), PATH=path))
    line = _error_line(proc)
    assert "sbatch was not found on PATH" in line and "nothing was written" in line
    assert "cluster.dry_run=true" in line
    assert not out.exists()


# -- 7. limits of the run guards and the line cap -----------------------------------------------------------------


@pytest.mark.parametrize("override, problem", [
    ("train.max_skipped_steps=0", "train.max_skipped_steps=0 must be >= 1"),
    ("train.loss_spike_factor=1.0", "train.loss_spike_factor=1.0 must be > 1"),
    ("train.loss_spike_window=0", "train.loss_spike_window=0 must be >= 1"),
    ("train.exit_duration_minutes=0", "train.exit_duration_minutes=0.0 must be > 0"),
    ("data.max_line_bytes=1000", "data.max_line_bytes=1000 must be >= 1024"),
])
def test_guard_and_line_cap_limits_name_the_key(override, problem):
    with pytest.raises(ConfigError) as e:
        validate(compose(["+model=qwen3", "train.max_epochs=1", override]), 1)
    assert [p for p in e.value.problems if p.startswith(problem)], e.value.problems


def test_guard_settings_in_range_pass():
    validate(compose(["+model=qwen3", "train.max_epochs=1", "train.max_skipped_steps=1",
                      "train.loss_spike_factor=1.5", "train.loss_spike_window=1", "train.exit_duration_minutes=0.5",
                      "data.max_line_bytes=1024"]), 1)
