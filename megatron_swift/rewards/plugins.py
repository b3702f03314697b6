"""Load user reward functions from Python files (``task.reward_plugins``).

A plugin is a plain ``.py`` file that registers rewards at import time:

    from megatron_swift.rewards import reward

    @reward("my_reward")
    def my_reward(prompts, completions, solution, **columns):
        return [float(s in c) for s, c in zip(solution, completions)]

Each file is imported by path under its own module name, so two files called
``rewards.py`` in different folders do not collide. Any failure (missing file,
syntax error, exception while importing, a name clash) becomes one
``RewardPluginError`` line ``file:line: Type: message``, and the rewards the
failed file had registered before failing are removed again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_swift.rewards import registry


class RewardPluginError(RuntimeError):
    """A reward plugin file that cannot be loaded; the message is one line naming file and line."""


def _module_name(path: Path) -> str:
    """A module name unique to the file's resolved path."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    stem = "".join(ch if ch.isalnum() else "_" for ch in path.stem)
    return f"megatron_swift_reward_plugin_{stem}_{digest}"


def _failing_line(error: BaseException, path: Path) -> Optional[int]:
    """The line of ``path`` where ``error`` happened: the innermost traceback frame in that file."""
    if isinstance(error, SyntaxError) and error.filename and Path(error.filename).resolve() == path:
        return error.lineno
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.filename and Path(frame.filename).resolve() == path:
            line = frame.lineno
    if line is None and isinstance(error, SyntaxError):
        return error.lineno  # a syntax error in a file the plugin imports: its own line is the best we have
    return line


def _describe_error(error: BaseException) -> str:
    """``Type: message`` on one line (SyntaxError without its location, which the prefix already gives)."""
    text = error.msg if isinstance(error, SyntaxError) and error.msg else str(error)
    text = " ".join(str(text).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_plugin(path: str) -> List[str]:
    """Import one plugin file; return the reward names its decorators registered."""
    resolved = Path(os.path.expanduser(path)).resolve()
    if not resolved.is_file():
        raise RewardPluginError(f"{path}: reward plugin file not found")
    name = _module_name(resolved)
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise RewardPluginError(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    before, outer = registry._snapshot(), registry._recording
    registry._recording = recorded = []
    # In sys.modules during its import, as a normal import would be (dataclasses and pickle look it up).
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # noqa: BLE001 - SystemExit in a plugin is a plugin error too
        sys.modules.pop(name, None)
        registry._restore(before)
        if isinstance(e, KeyboardInterrupt):
            raise
        line = _failing_line(e, resolved)
        where = f"{path}:{line}" if line is not None else path
        raise RewardPluginError(f"{where}: {_describe_error(e)}") from e
    finally:
        registry._recording = outer  # a plugin may load plugins itself
    return recorded


def load_plugins(paths: Sequence[str]) -> List[str]:
    """Import each plugin file in order; return the reward names they registered.

    Loading a file again re-registers its rewards (same definitions are not a
    clash) and returns their names again.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # one path given bare, e.g. from a command-line override
    names: List[str] = []
    for path in paths:
        for name in load_plugin(str(path)):
            if name not in names:
                names.append(name)
    return names
