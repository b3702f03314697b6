"""Compose the run config from conf/ without the CLI (tests, tools, benchmarks), and the command-line
overrides as people type them turned into what Hydra's override grammar accepts."""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import typing
from typing import FrozenSet, List, Sequence

from omegaconf import DictConfig

from megatron_swift.config.schema import Config, register

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


_PATTERN_KEY = re.compile(r"^([+~]*[\w.]*regex)=(?!['\"])(.+)$")
_OVERRIDE = re.compile(r"^(\+{0,2})([\w.]+)=(.*)$", re.DOTALL)


def normalize_overrides(overrides: Sequence[str]) -> List[str]:
    """Command-line overrides as typed, made acceptable to Hydra: ``*regex=`` values quoted, and a plain
    value of a list-typed key (``data.path=a.jsonl``) made a list (``data.path=['a.jsonl']``)."""
    return [_as_list(_quote_pattern(item)) for item in overrides]


def _quote_pattern(item: str) -> str:
    r"""Quote the value of a ``*regex=`` override for Hydra.

    ``train.freeze_regex='^decoder\.layers\.(0|1)\..*'`` reaches the program without its quotes
    (the shell removes them), and Hydra's override grammar refuses ``(``, ``|`` and ``*``
    unquoted; a regex is always a string, so it is quoted here."""
    match = _PATTERN_KEY.match(item)
    return f"{match.group(1)}={_quoted(match.group(2))}" if match else item


def _as_list(item: str) -> str:
    """``key=value`` with ``value`` made a list when ``key`` is list-typed in the schema and the value is a
    plain one: a single path is what people type, and Hydra refuses it for a list. Commas separate entries
    (unbracketed, Hydra would take them for a multirun sweep); each entry is quoted, so paths and options
    such as ``--mem=0`` or ``~/x`` pass the grammar. Bracketed lists, quoted values, ``null`` and
    interpolations are left as typed; an empty value is the empty list."""
    match = _OVERRIDE.match(item)
    if not match or match.group(2) not in list_keys():
        return item
    prefix, key, value = match.groups()
    if value.startswith("[") or value == "null" or "${" in value:
        return item
    if value.startswith(("'", '"')):  # quoted for Hydra by the person (say, a path with a comma): one entry
        return f"{prefix}{key}=[{value}]"
    entries = [_quoted(entry.strip()) for entry in value.split(",") if entry.strip()]
    return f"{prefix}{key}=[{','.join(entries)}]"


def _quoted(text: str) -> str:
    """``text`` as a single-quoted Hydra string. In Hydra's quoted strings a run of backslashes is literal
    unless it comes before a quote or the closing quote; such runs are doubled and the quote escaped."""
    escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text)
    return f"'{escaped}'"


@functools.lru_cache(maxsize=None)
def list_keys() -> FrozenSet[str]:
    """Dotted names of every list-typed field of the run config (data.path, train.freeze, ...), from the schema."""
    return frozenset(_list_fields(Config, ""))


def _list_fields(node: type, prefix: str) -> List[str]:
    hints = typing.get_type_hints(node)
    keys = []
    for f in dataclasses.fields(node):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += _list_fields(kind, f"{prefix}{f.name}.")
        elif _is_list(kind):
            keys.append(prefix + f.name)
    return keys


def _is_list(kind) -> bool:
    """List[...] or Optional[List[...]]."""
    if typing.get_origin(kind) is list:
        return True
    return typing.get_origin(kind) is typing.Union and any(_is_list(arg) for arg in typing.get_args(kind))



def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The same config ``launch/train.py`` would build from these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=normalize_overrides(overrides))


def check_composes(overrides: Sequence[str]) -> None:
    """Compose the config once before Hydra's own run does, so that an unknown key or a missing config
    group option is one :class:`ConfigError` line naming it (Hydra would print a traceback). Hydra's own
    flags and ``hydra.*`` overrides are left to Hydra."""
    from hydra.errors import ConfigCompositionException, HydraException

    from megatron_swift.config.validate import ConfigError

    mine = [o for o in overrides if not o.startswith("-") and not o.lstrip("+~").startswith("hydra.")]
    try:
        compose(mine)
    except (ConfigCompositionException, HydraException) as e:
        raise ConfigError([_composition_problem(str(e), mine)]) from None


def _composition_problem(message: str, overrides: Sequence[str]) -> str:
    from megatron_swift.tasks.configs import SCHEMAS

    unknown = re.search(r"Could not override '([^']+)'", message)
    if unknown:
        key = unknown.group(1)
        if key.startswith("task."):
            task = next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), "lm")
            fields = [f.name for f in dataclasses.fields(SCHEMAS[task])] if task in SCHEMAS else []
            return f"{key}: task={task} has no such setting (its settings: {', '.join(fields)})"
        from megatron_swift.config.help import suggest

        task = next((o.split("=", 1)[1] for o in overrides if o.startswith("task=")), "lm")
        close = suggest(key, task)
        hint = f"did you mean {close}? " if close else ""
        return f"{key}: no such setting ({hint}the settings and their documentation: launch/train.py --help)"
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", message)
    if missing:
        group, name = missing.groups()
        folder = os.path.join(CONF_DIR, group)
        options = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml")) if os.path.isdir(folder) else []
        return f"{group}={name}: no such {group}; choose one of: {', '.join(options)}"
    return " ".join(message.split())
