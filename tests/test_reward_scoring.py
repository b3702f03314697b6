"""The rewards a GRPO run names, scored together (rewards/scoring.py): weights, the code sandbox among them,
and the configuration errors reported before any work."""
import pytest
from omegaconf import OmegaConf

from megatron_swift.rewards.scoring import Scorer, check_names
from megatron_swift.tasks.configs import GRPOConfig

CODE_OK = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n\\boxed{3}"
LOOP = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
BOMB = "```python\nx = bytearray(8 * 1024 ** 3)\ndef add(a, b):\n    return a + b\n```\n\\boxed{4}"
HALF = "```python\ndef add(a, b):\n    return a * b\n```"


def _cfg(**kw):
    cfg = OmegaConf.structured(GRPOConfig(**kw))
    cfg.sandbox.wall_seconds, cfg.sandbox.cpu_seconds, cfg.sandbox.memory_mb = 3, 2, 256
    return cfg


def test_weighted_rewards_with_code_execution_by_hand():
    scorer = Scorer(_cfg(rewards=["code", "accuracy"], reward_weights=[1.0, 0.5]))
    completions = [CODE_OK, LOOP, BOMB, HALF, "no code at all, \\boxed{3}"]
    tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 4"]] * 5
    columns = {"tests": tests, "solution": ["3"] * 5, "completion_lengths": [10] * 5}
    results = scorer.score([[{"role": "user", "content": "add"}]] * 5, completions, columns)
    # code: all pass, killed at the time limit, killed by the memory limit, 1 of 2, nothing to run
    assert list(results["code"]) == [1.0, 0.0, 0.0, 0.5, 0.0]
    # accuracy: \boxed{3} right twice, \boxed{4} wrong, none written
    assert list(results["accuracy"]) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert scorer.total(results) == pytest.approx([1.5, 0.0, 0.0, 0.5, 0.5])


def test_configuration_problems_are_named(tmp_path):
    problems = check_names(_cfg(rewards=["accuracy", "nope"], reward_weights=[1.0]))
    assert any("unknown reward 'nope'" in p and "task.reward_plugins" in p for p in problems), problems
    assert any("task.reward_weights has 1 values for 2 rewards" in p for p in problems), problems
    assert any("task.judge.model is not set" in p for p in check_names(_cfg(rewards=["judge"])))
    broken = tmp_path / "mine.py"
    broken.write_text("import nothing_here_at_all\n")
    (problem,) = check_names(_cfg(rewards=["accuracy"], reward_plugins=[str(broken)]))
    assert problem.startswith(f"task.reward_plugins: {broken}:1: ModuleNotFoundError"), problem


def test_sandbox_settings_are_checked_before_work():
    problems = check_names(_cfg(rewards=["code"]))
    assert problems == []
    cfg = _cfg(rewards=["code"])
    cfg.sandbox.memory_mb, cfg.sandbox.isolation = 0, "docker"
    problems = check_names(cfg)
    assert "task.sandbox.memory_mb=0 must be > 0" in problems
    assert any(p.startswith("task.sandbox.isolation=docker: isolation must be one of bwrap, none") for p in problems)


def test_missing_isolator_stops_the_run_before_any_model(tmp_path):
    """As a user meets it: bubblewrap not installed -> one line naming the fix, exit 2, nothing built."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT, TRAIN, train_env

    prompts = tmp_path / "code.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Write add(a, b)."}],
                                   "tests": ["assert add(1, 2) == 3"]}) + "\n")
    env = dict(train_env(), PATH=str(tmp_path))  # no bwrap (nor anything else) on PATH
    proc = subprocess.run([sys.executable, str(TRAIN), "+model=qwen3", "task=grpo", "task.rewards=[code]",
                           "data=prompts", f"data.path=[{prompts}]", "task.max_completion_length=16",
                           "task.beta=0", f"train.output_dir={tmp_path / 'out'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("megatron-swift: error: task.sandbox.isolation=bwrap: the code sandbox cannot start: "
                               "bubblewrap (bwrap) is not installed"), lines[0]
    assert "apt-get install bubblewrap" in lines[0]
    assert not (tmp_path / "out").exists()
