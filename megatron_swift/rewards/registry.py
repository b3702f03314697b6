"""Reward functions by name: register, look up, configure, call safely, combine.

A reward function is called as ``fn(prompts, completions, **columns) -> list``:

* ``prompts``: one entry per completion, the row's prompt messages (a list of
  ``{"role", "content"}`` dicts);
* ``completions``: the generated assistant text (str, without end-of-turn token);
* ``columns``: every other column of the rows, each a list aligned with
  ``completions`` (``solution=[...]``, ``tests=[...]``, ``completion_lengths=[...]``).

It returns one number per completion (bool, int or float). ``None`` (or NaN,
the convention of TRL's reward functions) means "does not apply to this
completion" and becomes 0.0 here, counted in ``RewardResult.skipped``; a
reward that wants such rows left out of the group statistics must say so in
its own way, 0.0 is what the trainer sees.

Functions are registered with ``@reward("name")``; built-ins live in
``builtin.py``, user functions in plugin files (``plugins.load_plugins``).
Built-ins that take parameters are registered together with a factory, and
``configure(name, **params)`` replaces the registered function with
``factory(**params)``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

RewardFn = Callable[..., Sequence[Any]]

_REGISTRY: Dict[str, RewardFn] = {}
_FACTORIES: Dict[str, Callable[..., RewardFn]] = {}
# Built-in rewards that take the run's settings (a sandbox, a model): the Scorer builds them
# (rewards/scoring.py), and their names are taken like any built-in's.
BUILT_BY_RUN = {"code": "the built-in code-execution reward (rewards/code.py)",
                "judge": "the built-in LLM judge reward (rewards/judge.py)"}
# While a plugin file is imported, the names its decorators register (see plugins.py).
_recording: Optional[List[str]] = None


class UnknownReward(KeyError):
    """A reward name nobody registered."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quotes, escaped newlines); show the message as is.
        return str(self.args[0]) if self.args else ""


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not one number per completion.

    ``row``: the index of the completion it failed on, when known. Only the rank that scores sees it
    (``rank_local``: the trainer prints it there, not on rank 0)."""

    rank_local = True

    def __init__(self, message: str, row: Optional[int] = None):
        super().__init__(message)
        self.row = row


class RewardResult(list):
    """The rewards of one function (a ``list[float]``) plus counts for metrics.

    ``errors``: rows whose call raised and were scored 0.0 (``on_error="zero"``);
    ``skipped``: rows the function returned None/NaN for (scored 0.0);
    ``first_error``: one-line description of the first failure, for logs.
    """

    def __init__(self, name: str, values: Sequence[float] = (), errors: int = 0, skipped: int = 0,
                 first_error: Optional[str] = None):
        super().__init__(values)
        self.name = name
        self.errors = errors
        self.skipped = skipped
        self.first_error = first_error


def describe(fn: Any) -> str:
    """``qualname (file:line)`` of a function or callable object, for error messages."""
    code = getattr(fn, "__code__", None) or getattr(getattr(type(fn), "__call__", None), "__code__", None)
    qual = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code is not None else ""
    return f"{qual}{where}"


def _same_definition(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` are one function or the same source definition imported twice.

    Loading a plugin file twice creates new function objects from the same
    source; that is a reload, not a clash of two rewards with one name.
    Closures never count as the same definition (their parameters may differ).
    """
    if a is b:
        return True
    ca, cb = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if ca is None or cb is None or a.__closure__ or b.__closure__:
        # Closures from one factory share their code but not their parameters: not the same reward.
        return False
    return (ca.co_filename, ca.co_firstlineno, a.__qualname__) == (cb.co_filename, cb.co_firstlineno, b.__qualname__)


def reward(name: str, factory: Optional[Callable[..., RewardFn]] = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn`` under ``name``; returns ``fn`` unchanged.

    ``factory`` (optional) builds a configured variant: ``configure(name, **params)``
    registers ``factory(**params)`` in place of ``fn``. Registering a different
    function under a taken name raises ValueError naming both.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorate(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"@reward({name!r}) needs a callable, got {type(fn).__name__}")
        if name in BUILT_BY_RUN:
            raise ValueError(f"reward {name!r} is already registered by {BUILT_BY_RUN[name]}; cannot register "
                             f"{describe(fn)} under the same name (rename one)")
        old = _REGISTRY.get(name)
        if old is not None and not _same_definition(old, fn):
            raise ValueError(f"reward {name!r} is already registered by {describe(old)}; "
                             f"cannot register {describe(fn)} under the same name (rename one)")
        _REGISTRY[name] = fn
        if factory is not None:
            _FACTORIES[name] = factory
        if _recording is not None and name not in _recording:
            _recording.append(name)
        return fn

    return decorate


def get(name: str) -> RewardFn:
    """The function registered under ``name``; ``UnknownReward`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownReward(
            f"unknown reward {name!r}; known rewards: {', '.join(names()) or '(none)'}. "
            f"A reward defined in your own file is found once the file is listed in task.reward_plugins"
        ) from None


def names() -> List[str]:
    """Registered reward names, sorted."""
    return sorted(_REGISTRY)


def configure(name: str, **params: Any) -> RewardFn:
    """Register ``factory(**params)`` under ``name`` (replacing the current function) and return it.

    Only names registered with a factory take parameters (the built-ins
    ``format``, ``soft_overlong``, ``repetition``). Unknown or invalid
    parameters raise ValueError naming the reward.
    """
    get(name)  # UnknownReward with the list of names
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"reward {name!r} takes no parameters (got {sorted(params)})")
    try:
        fn = factory(**params)
    except TypeError as e:
        # An unknown keyword: say which reward, the rest of the message names the keyword.
        raise ValueError(f"reward {name!r}: {e}") from e
    _REGISTRY[name] = fn
    return fn


def _check_inputs(prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Sequence[Any]]) -> int:
    """Number of completions; ValueError if prompts or a column is not aligned with completions."""
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions (one prompt per completion expected)")
    for key, col in columns.items():
        if len(col) != n:
            raise ValueError(f"column {key!r} has {len(col)} entries for {n} completions")
    return n


def _to_floats(name: str, fn: Any, out: Any, n: int) -> tuple:
    """(floats, number of None/NaN entries); RewardError if ``out`` is not ``n`` numbers."""
    if hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
        out = out.tolist()  # numpy array / torch tensor
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"reward {name!r} ({describe(fn)}) returned {type(out).__name__}; "
                          f"expected a list of {n} numbers")
    if len(out) != n:
        raise RewardError(f"reward {name!r} ({describe(fn)}) returned {len(out)} values for {n} completions")
    values, skipped = [], 0
    for i, v in enumerate(out):
        if v is None:
            values.append(0.0)
            skipped += 1
        elif isinstance(v, numbers.Real):  # bool, int, float, numpy scalars
            f = float(v)
            if math.isnan(f):
                values.append(0.0)
                skipped += 1
            elif math.isinf(f):
                raise RewardError(f"reward {name!r} ({describe(fn)}) returned {f} for row {i}")
            else:
                values.append(f)
        else:
            raise RewardError(f"reward {name!r} ({describe(fn)}) returned {type(v).__name__} {v!r:.80} for row {i}; "
                              f"expected a number or None")
    return values, skipped


def _one_line(e: BaseException) -> str:
    """``Type: message`` on one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _row(i: int, prompts, completions, columns):
    """Row ``i`` as a batch of one."""
    return [prompts[i]], [completions[i]], {k: list(v[i:i + 1]) for k, v in columns.items()}


def call(name: str, fn: RewardFn, prompts: Sequence[Any], completions: Sequence[str],
         columns: Optional[Mapping[str, Sequence[Any]]] = None, on_error: str = "raise") -> RewardResult:
    """Call ``fn(prompts, completions, **columns)`` and return its rewards as a ``RewardResult``.

    ``on_error="raise"``: if the function raises, ``RewardError`` with one line
    naming the reward, its source and the first failing row (found by calling
    the function row by row, since a batched call does not say which row broke)
    and the exception. ``on_error="zero"``: failing rows score 0.0 and are
    counted in ``result.errors`` (rows that succeed alone keep their reward).
    A result that is not one number (or None) per completion is a bug in the
    function and raises ``RewardError`` in both modes.
    """
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
    columns = dict(columns or {})
    n = _check_inputs(prompts, completions, columns)
    if n == 0:
        return RewardResult(name)
    try:
        out = fn(list(prompts), list(completions), **columns)
    except Exception as batch_error:  # noqa: BLE001 - any failure of user code is reported, by row
        return _call_by_row(name, fn, prompts, completions, columns, on_error, batch_error)
    values, skipped = _to_floats(name, fn, out, n)
    return RewardResult(name, values, skipped=skipped)


def _call_by_row(name, fn, prompts, completions, columns, on_error, batch_error) -> RewardResult:
    """Re-call ``fn`` one row at a time after the batched call raised ``batch_error``."""
    values, errors, skipped, first = [], 0, 0, None
    for i in range(len(completions)):
        p, c, cols = _row(i, prompts, completions, columns)
        try:
            out = fn(p, c, **cols)
        except Exception as e:  # noqa: BLE001
            msg = f"reward {name!r} ({describe(fn)}) failed on row {i}: {_one_line(e)}"
            if on_error == "raise":
                raise RewardError(msg, row=i) from e
            values.append(0.0)
            errors += 1
            first = first or msg
            continue
        v, s = _to_floats(name, fn, out, 1)
        values += v
        skipped += s
    if errors == 0 and on_error == "raise":
        # Fails on the batch but on no single row: still a broken function, report the batch error.
        raise RewardError(f"reward {name!r} ({describe(fn)}) failed on the batch of {len(completions)} "
                          f"but on no single row: {_one_line(batch_error)}") from batch_error
    return RewardResult(name, values, errors=errors, skipped=skipped,
                        first_error=first or f"reward {name!r} batch call: {_one_line(batch_error)}")


def combine(per_function: Mapping[str, Sequence[float]], weights: Optional[Sequence[float]] = None) -> List[float]:
    """Weighted sum over functions: ``sum_k weights[k] * per_function[k][i]`` for each completion ``i``.

    ``weights`` follows the order of ``per_function`` (insertion order); None
    weighs every function 1.0.
    """
    rows = list(per_function.values())
    if weights is None:
        weights = [1.0] * len(rows)
    if len(weights) != len(rows):
        raise ValueError(f"{len(weights)} weights for {len(rows)} reward functions ({', '.join(per_function)})")
    if not rows:
        raise ValueError("combine needs at least one reward function")
    n = len(rows[0])
    for key, r in per_function.items():
        if len(r) != n:
            raise ValueError(f"reward {key!r} has {len(r)} values, expected {n}")
    return [float(sum(w * r[i] for w, r in zip(weights, rows))) for i in range(n)]


def _snapshot() -> tuple:
    """The registry state (for plugins to undo a failed import, and for tests)."""
    return dict(_REGISTRY), dict(_FACTORIES)


def _restore(state: tuple) -> None:
    """Put back a state taken by ``_snapshot``."""
    reg, fac = state
    _REGISTRY.clear()
    _REGISTRY.update(reg)
    _FACTORIES.clear()
    _FACTORIES.update(fac)
