"""``launch/train.py --help``: what can be chosen and every setting with its one-line documentation, read
from the schema dataclasses (config/schema.py, tasks/configs.py) and conf/, without Hydra or torch.

``task=<name> --help`` (or ``+model=<family>``, ``data=<group>`` ...) shows that choice's own settings and
values; ``suggest`` finds the setting a misspelt key meant.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import typing
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

USAGE = """usage: torchrun --nproc_per_node N launch/train.py +model=<family> [group=<option> ...] [key=value ...]

Trains on megatron-core from one composed config (conf/config.yaml and its groups). Examples:
  torchrun --nproc_per_node 2 launch/train.py +model=qwen3                       # the CPU demo
  torchrun --nproc_per_node 8 launch/train.py +model=qwen3 model.pretrained=/ckpt/Qwen3-8B parallel.tp=4 \\
      data=sft data.path=[train.jsonl] train.max_epochs=3
  python launch/train.py task=grpo --help                                          # a task's own settings
"""


def field_docs(cls: type) -> Dict[str, str]:
    """{field: its one-line docstring} of a config dataclass (the string literal after each field)."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.getsource(klass))
        body = tree.body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and i + 1 < len(body):
                nxt = body[i + 1]
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def settings(cls: type, prefix: str = "") -> Iterator[Tuple[str, object, str]]:
    """(dotted key, default, doc) of every leaf setting of ``cls``, nested groups included."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from settings(kind, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
        yield f"{prefix}{f.name}", default, docs.get(f.name, "")


def _groups() -> Dict[str, List[str]]:
    from megatron_swift.config.compose import CONF_DIR

    out = {}
    for group in sorted(os.listdir(CONF_DIR)):
        folder = os.path.join(CONF_DIR, group)
        if os.path.isdir(folder):
            out[group] = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml"))
    return out


def _families() -> List[str]:
    from megatron_swift.models import families

    lines = []
    for name in families.names():
        family = families.get(name)
        archs = ", ".join(family.hf_architectures)
        lines.append(f"  {name:10s} sizes: {', '.join(family.sizes)}  (HF: {archs})")
    return lines


def _choice(overrides: Sequence[str], group: str) -> Optional[str]:
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        if key == group and value:
            return value
    return None


def render(overrides: Sequence[str] = ()) -> str:
    """The help text; choices among ``overrides`` (``task=grpo``) narrow it to that choice's settings."""
    from megatron_swift.config.schema import Config
    from megatron_swift.tasks.configs import SCHEMAS, TaskConfig

    groups = _groups()
    task = _choice(overrides, "task") or "lm"
    out = [USAGE, "Model families (+model=<family>, model.size=<size>, or model.pretrained=<HF folder>):"]
    out += _families()
    out.append("\nConfig groups (group=<option>):")
    for group, options in groups.items():
        out.append(f"  {group:8s} {', '.join(options)}")
    out.append(f"\nSettings (key=value){'' if task == 'lm' else f'; task={task}'}:")
    for key, default, doc in settings(Config):
        if key.startswith("task."):
            continue
        out.append(f"  {key} = {_show(default)}\n      {doc}")
    schema = SCHEMAS.get(task, TaskConfig)
    out.append(f"\nTask settings of task={task} ({', '.join(sorted(SCHEMAS))}: task=<name> --help shows each):")
    for key, default, doc in settings(schema, "task."):
        out.append(f"  {key} = {_show(default)}\n      {doc}")
    out.append("\nValues given by a group file (conf/<group>/<option>.yaml) replace these defaults; "
               "the whole composed config: --cfg job.")
    return "\n".join(out) + "\n"


def _show(value) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def all_keys(task: str = "lm") -> List[str]:
    from megatron_swift.config.schema import Config
    from megatron_swift.tasks.configs import SCHEMAS, TaskConfig

    keys = [key for key, _, _ in settings(Config) if not key.startswith("task.")]
    return keys + [key for key, _, _ in settings(SCHEMAS.get(task, TaskConfig), "task.")]


def suggest(key: str, task: str = "lm") -> Optional[str]:
    """The setting a misspelt ``key`` most likely meant, or None."""
    close = difflib.get_close_matches(key, all_keys(task), n=1, cutoff=0.75)
    return close[0] if close else None
