"""Scoring a batch of completions with the rewards a run names (task.rewards, task.reward_weights).

``Scorer`` is what the GRPO source calls: it loads the plugin files, configures the built-ins from the task
config, and returns the weighted total plus every function's own rewards and error counts (for metrics).
The ``code`` reward (rewards/code.py, a sandbox) and the ``judge`` reward (rewards/judge.py, a model) are
wired in here, since they take the run's settings; everything else comes from the registry by name.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from megatron_swift.rewards import registry
from megatron_swift.rewards.plugins import load_plugins

# Rewards that take something from the run (a sandbox, a model): built by the Scorer, not the registry.
RUN_REWARDS = tuple(registry.BUILT_BY_RUN)


def check_names(task_cfg) -> List[str]:
    """Problems with task.rewards / reward_weights / reward_plugins (plugin files are imported here, so an
    error in one is reported before any heavy work)."""
    problems = []
    try:
        load_plugins(list(task_cfg.reward_plugins))
    except Exception as e:  # RewardPluginError: one line naming the file and line
        return [f"task.reward_plugins: {e}"]
    known = set(registry.names()) | set(RUN_REWARDS)
    for name in task_cfg.rewards:
        if name not in known:
            problems.append(f"task.rewards: unknown reward {name!r}; known: {', '.join(sorted(known))} "
                            "(a function from your own file: add the file to task.reward_plugins)")
    if not task_cfg.rewards:
        problems.append("task.rewards is empty: name at least one reward function")
    weights = task_cfg.reward_weights
    if weights is not None and len(weights) != len(task_cfg.rewards):
        problems.append(f"task.reward_weights has {len(weights)} values for {len(task_cfg.rewards)} rewards "
                        "(one weight per task.rewards entry, or leave it unset)")
    problems += _parameter_problems(task_cfg)
    if task_cfg.reward_on_error not in ("raise", "zero"):
        problems.append(f"task.reward_on_error={task_cfg.reward_on_error} is not one of: raise, zero")
    return problems


# Columns the built-in rewards read from every prompt row (data.prompts checks them when reading).
REQUIRED_COLUMNS = {"accuracy": "solution", "code": "tests"}


def _parameter_problems(task_cfg) -> List[str]:
    """The settings of the rewards in use: checked here so that nothing fails after the model is built."""
    import os
    import re

    used, problems = set(task_cfg.rewards), []
    if "format" in used:
        try:
            re.compile(task_cfg.format_pattern)
        except re.error as e:
            problems.append(f"task.format_pattern is not a regular expression: {e}")
    if "soft_overlong" in used and not 0 < task_cfg.overlong_buffer <= task_cfg.max_completion_length:
        problems.append(f"task.overlong_buffer={task_cfg.overlong_buffer} must be in [1, "
                        f"task.max_completion_length={task_cfg.max_completion_length}] for the soft_overlong reward")
    if "repetition" in used and task_cfg.repetition_ngram < 1:
        problems.append(f"task.repetition_ngram={task_cfg.repetition_ngram} must be >= 1")
    if "code" in used:
        problems += _sandbox_problems(task_cfg.sandbox)
    if "judge" in used:
        judge = task_cfg.judge
        if not judge.model:
            problems.append("task.rewards has judge but task.judge.model is not set (an HF folder)")
        elif not os.path.isfile(os.path.join(judge.model, "config.json")):
            problems.append(f"task.judge.model={judge.model} is not an HF checkpoint folder (no config.json)")
        if judge.template and not os.path.isfile(judge.template):
            problems.append(f"task.judge.template={judge.template} is not a file")
        try:
            re.compile(judge.pattern)
        except re.error as e:
            problems.append(f"task.judge.pattern is not a regular expression: {e}")
        if not judge.min_score < judge.max_score:
            problems.append(f"task.judge.min_score={judge.min_score} must be below task.judge.max_score={judge.max_score}")
    return problems


def _sandbox_problems(sandbox_cfg) -> List[str]:
    """The code reward's settings, and whether its isolator runs here (a probe box): a run that cannot
    isolate its code stops before any model is built."""
    from megatron_swift.rewards.sandbox import SandboxLimits, isolation_problem

    problems = []
    for name in SandboxLimits.__dataclass_fields__:
        if getattr(sandbox_cfg, name) <= 0:
            problems.append(f"task.sandbox.{name}={getattr(sandbox_cfg, name)} must be > 0")
    if sandbox_cfg.workers < 1:
        problems.append(f"task.sandbox.workers={sandbox_cfg.workers} must be >= 1")
    problem = isolation_problem(sandbox_cfg.isolation)
    if problem:
        problems.append(f"task.sandbox.isolation={sandbox_cfg.isolation}: {problem}")
    return problems


class Scorer:
    """``score(prompts, completions, columns, names)`` -> {name: RewardResult}; ``total(results)`` weights them.

    ``collective`` names a reward that every rank of a model-parallel group must compute together (the judge
    runs a model under that layout); the others run on one rank and are shared (rollout.source)."""

    collective = frozenset({"judge"})

    def __init__(self, task_cfg, judge_generate: Optional[Callable[[List[str]], List[str]]] = None):
        load_plugins(list(task_cfg.reward_plugins))
        self.on_error = task_cfg.reward_on_error
        self.weights = list(task_cfg.reward_weights) if task_cfg.reward_weights is not None else None
        self.functions = {name: self._function(name, task_cfg, judge_generate) for name in task_cfg.rewards}
        self.notes = []
        """Lines a run prints once at its start (which isolation and limits the code reward has)."""
        if "code" in self.functions:
            from megatron_swift.rewards.sandbox import describe
            self.notes.append(describe(task_cfg.sandbox.isolation))

    @staticmethod
    def _function(name: str, task_cfg, judge_generate):
        if name == "code":
            return _code_reward(task_cfg.sandbox)
        if name == "judge":
            return _judge_reward(task_cfg.judge, judge_generate)
        params = {"format": dict(pattern=task_cfg.format_pattern),
                  "soft_overlong": dict(max_completion_length=task_cfg.max_completion_length,
                                        buffer=task_cfg.overlong_buffer),
                  "repetition": dict(ngram_size=task_cfg.repetition_ngram,
                                     max_penalty=task_cfg.repetition_max_penalty)}.get(name)
        return registry.configure(name, **params) if params is not None else registry.get(name)

    def score(self, prompts: Sequence[list], completions: Sequence[str], columns: Dict[str, list],
              names: Optional[Sequence[str]] = None) -> Dict[str, registry.RewardResult]:
        return {name: registry.call(name, self.functions[name], prompts, completions, columns, self.on_error)
                for name in (self.functions if names is None else names)}

    def total(self, results: Dict[str, Sequence[float]]) -> List[float]:
        """The weighted sum, in task.rewards order."""
        return registry.combine({name: results[name] for name in self.functions}, self.weights)

    def judge_malformed(self) -> Optional[float]:
        """Share of the last judge call's replies that had no score (None without a judge)."""
        judge = self.functions.get("judge")
        if judge is None or not judge.last_replies:
            return None
        return judge.last_malformed / len(judge.last_replies)


def _code_reward(sandbox_cfg):
    from megatron_swift.rewards.code import code_reward
    from megatron_swift.rewards.sandbox import SandboxLimits

    limits = SandboxLimits(**{name: getattr(sandbox_cfg, name) for name in SandboxLimits.__dataclass_fields__})

    def code(prompts, completions, tests=None, **columns):
        return code_reward(prompts, completions, tests=tests, limits=limits, workers=sandbox_cfg.workers,
                           isolation=sandbox_cfg.isolation, uid_base=sandbox_cfg.uid_base)

    return code


def _judge_reward(judge_cfg, generate):
    from megatron_swift.rewards.judge import DEFAULT_TEMPLATE, JudgeReward

    if generate is None:
        raise ValueError("the judge reward needs a judge model (task.judge.model)")
    template = DEFAULT_TEMPLATE
    if judge_cfg.template:
        with open(judge_cfg.template, encoding="utf-8") as f:
            template = f.read()
    return JudgeReward(generate, template=template, pattern=judge_cfg.pattern, scale=judge_cfg.scale,
                       score_range=(judge_cfg.min_score, judge_cfg.max_score))
