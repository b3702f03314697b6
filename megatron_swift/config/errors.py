"""The configuration error type, in a module of its own: anything may raise it (validation, tasks, the
judge's model) without importing validation and, through it, every task."""
from __future__ import annotations

from typing import List


class ConfigError(ValueError):
    """One or more configuration problems, each naming the key to change."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
