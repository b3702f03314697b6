"""Modules that used to import each other (at module level or inside functions) no longer do."""
from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

UNTANGLED = [("megatron_swift.convert.hf_export", "megatron_swift.convert.lora_export"),
             ("megatron_swift.data.sft", "megatron_swift.data.streaming")]


def imports(module: str) -> set:
    """Every megatron_swift module ``module`` imports, wherever in it the import statement is."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_swift"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("a,b", UNTANGLED)
def test_the_pair_imports_one_way_only(a, b):
    assert not (b in imports(a) and a in imports(b)), f"{a} and {b} import each other"
