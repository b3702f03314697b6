"""Reward functions for online RL (GRPO): a registry, built-ins, plugin files and an LLM judge.

Plugin files register their functions with ``from megatron_swift.rewards import reward``.
Importing this package registers the built-ins (``accuracy``, ``format``,
``soft_overlong``, ``repetition``); see ``registry`` for the calling convention.
"""
from megatron_swift.rewards import builtin  # noqa: F401  - registers the built-in rewards
from megatron_swift.rewards.judge import JudgeReward, JudgeTemplateError
from megatron_swift.rewards.plugins import RewardPluginError, load_plugins
from megatron_swift.rewards.registry import (RewardError, RewardResult, UnknownReward, call, combine, configure,
                                             get, names, reward)

__all__ = ["JudgeReward", "JudgeTemplateError", "RewardError", "RewardPluginError", "RewardResult",
           "UnknownReward", "builtin", "call", "combine", "configure", "get", "load_plugins", "names", "reward"]
