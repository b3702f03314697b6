"""import_cost: megatron-core imported without TorchDynamo/Inductor or wandb, torch.compile and wandb untouched
afterwards, and a deferred compile that still compiles (once, at the first call) what megatron-core decorated."""
from __future__ import annotations

import subprocess
import sys

import torch

from megatron_swift.import_cost import _compile_at_first_call
from tests.conftest import ROOT


def test_megatron_core_imports_without_compiler_and_leaves_torch_compile_alone():
    probe = ("import sys, torch, megatron_swift, megatron.core.models.gpt, megatron.core.optimizer\n"
             "from megatron.core import jit\n"
             "from megatron.core.inference.contexts import dynamic_context\n"
             "print('torch._inductor.compile_fx' in sys.modules, torch.compile.__module__, "
             "jit.jit_fuser is torch.compile, 'wandb' in sys.modules, dynamic_context.HAVE_WANDB)\n"
             "import wandb\n"
             "print(callable(wandb.init))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    # No compiler, no wandb during the import; torch.compile untouched and wandb importable afterwards.
    assert out.stdout.split() == ["False", "torch", "False", "False", "False", "True"], out.stderr[-2000:]


def test_deferred_compile_calls_the_real_one_once_at_first_use():
    calls = []

    def real(model, **options):
        calls.append((model, options))
        return lambda *a: ("compiled", model(*a))

    compile_later = _compile_at_first_call(real)
    double = compile_later(lambda x: 2 * x, dynamic=False)
    assert calls == []  # decorating compiles nothing
    assert double(3) == ("compiled", 6) and double(4) == ("compiled", 8)
    assert len(calls) == 1 and calls[0][1] == {"dynamic": False}
    with_options = compile_later(fullgraph=True)(lambda x: x + 1)
    assert with_options(1) == ("compiled", 2) and calls[1][1] == {"fullgraph": True}
    module = torch.nn.Linear(2, 2)
    compile_later(module)  # a module goes straight to the real torch.compile
    assert calls[2][0] is module
