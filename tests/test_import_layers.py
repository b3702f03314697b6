"""The model and conversion code imports one way: no module of megatron_swift.models or megatron_swift.convert
reaches itself again through imports (function-level imports included), and model families stay below
models.arch (issue 28 item 10: families/base -> builder -> arch -> families was a circle)."""
import ast
import os

import megatron_swift

_ROOT = os.path.dirname(os.path.dirname(megatron_swift.__file__))
_LAYERS = ("megatron_swift.models", "megatron_swift.convert")


def _modules() -> dict:
    out = {}
    for folder, _, files in os.walk(os.path.dirname(megatron_swift.__file__)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, _ROOT)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: str, known: dict) -> set:
    """Modules of the package that ``name`` imports anywhere in its file (absolute imports: the project's style)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict:
    known = _modules()
    return {m: {t for t in _imports(m, p, known) if t.startswith(_LAYERS)}
            for m, p in known.items() if m.startswith(_LAYERS)}


def _reaches(graph: dict, start: str, goal: str) -> bool:
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return False


def test_models_and_convert_have_no_import_circle():
    graph = _graph()
    circles = sorted(m for m in graph if _reaches(graph, m, m))
    assert not circles, f"modules that import themselves through others: {circles}"


def test_families_stay_below_arch():
    graph = _graph()
    family_modules = [m for m in graph if m.startswith("megatron_swift.models.families")]
    assert len(family_modules) >= 6  # the registry, base and the family files were all scanned
    for m in family_modules:
        assert not _reaches(graph, m, "megatron_swift.models.arch"), f"{m} reaches models.arch"
    assert "megatron_swift.models.families" in graph["megatron_swift.models.arch"]
