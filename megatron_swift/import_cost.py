"""Import megatron-core without paying for what a run may never use (megatron-core 0.16.1, torch 2.13).

Importing ``megatron.core`` costs about 5 s of CPU per process, and every rank of every run pays it. About
3 s of that are spent on things a run does not use:

- ``megatron.core.jit`` sets ``jit_fuser = torch.compile`` and its fusion modules decorate functions with
  it at import time. ``torch.compile(fn)`` imports TorchDynamo and Inductor on the spot (about 2 s) even
  though compilation itself happens at the first call, and on CPU (and with TE) those fused functions are
  never called. While ``megatron.core`` is imported, ``torch.compile`` applied to a plain function is
  replaced by a wrapper that calls ``torch.compile`` at the function's first call: the same compiled code
  runs when it is used, and nothing is imported when it is not. ``torch.compile`` itself is restored as
  soon as the import finishes (modules and options passed to it go straight through).
- ``megatron.core.inference.contexts.dynamic_context`` imports ``wandb`` (about 1 s) for the dynamic
  inference engine's own metrics logging, which this project does not use (its WandB sink imports wandb
  itself when a run logs there). While ``megatron.core`` is imported, ``import wandb`` raises ImportError,
  megatron-core's own "not installed" path; afterwards wandb imports normally. (A lazy module does not
  work here: ``inspect.getmodule``, which torch's op registration calls, touches every module in
  ``sys.modules`` and would load it.)

``install()`` (called from the package's ``__init__``) only adds a meta-path finder; the work happens
when ``megatron.core`` is first imported, so ``--help`` and other light imports stay light. Measured with
``/usr/bin/time python -c "import megatron.core.models.gpt, megatron.core.optimizer"``: 4.7 s -> 2.2 s of
CPU per process.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import inspect
import sys

_TARGET = "megatron.core"


def _compile_at_first_call(real_compile):
    """``torch.compile`` for plain functions deferred to their first call; anything else passes through."""

    def compile_later(model=None, **kwargs):
        if model is None:  # used as @torch.compile(...) with options
            return lambda fn: compile_later(fn, **kwargs)
        if not inspect.isfunction(model):
            return real_compile(model, **kwargs)
        compiled = []

        @functools.wraps(model)
        def call(*args, **kw):
            if not compiled:
                compiled.append(real_compile(model, **kwargs))
            return compiled[0](*args, **kw)

        return call

    return compile_later


@contextlib.contextmanager
def _deferred_compile():
    import torch

    real = torch.compile
    torch.compile = _compile_at_first_call(real)
    try:
        yield
    finally:
        torch.compile = real


@contextlib.contextmanager
def _without_wandb():
    """``import wandb`` fails (ImportError) for the duration, unless wandb is already imported; afterwards it
    imports normally (our WandB sink)."""
    hide = "wandb" not in sys.modules
    if hide:
        sys.modules["wandb"] = None  # the import system's own marker for "not importable"
    try:
        yield
    finally:
        if hide and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]


class _Loader(importlib.abc.Loader):
    """megatron.core's own loader, run with compilation deferred and wandb hidden."""

    def __init__(self, real):
        self.real = real

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.real
        with _deferred_compile(), _without_wandb():
            self.real.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # once; the normal finders locate the package
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Arrange for the next first import of megatron.core to be the lighter one (no-op once it is imported)."""
    if _TARGET in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
