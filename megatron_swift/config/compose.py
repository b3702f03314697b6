"""Compose the run config from conf/ without the CLI (tests, tools, benchmarks)."""
from __future__ import annotations

import os
import re
from typing import List, Sequence

from omegaconf import DictConfig

from megatron_swift.config.schema import register

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


_PATTERN_KEY = re.compile(r"^([+~]*[\w.]*regex)=(?!['\"])(.+)$")


def quote_patterns(overrides: Sequence[str]) -> List[str]:
    """Quote the values of ``*regex=`` overrides for Hydra.

    ``train.freeze_regex='^decoder\.layers\.(0|1)\..*'`` reaches the program without its quotes
    (the shell removes them), and Hydra's override grammar refuses ``(``, ``|`` and ``*``
    unquoted; a regex is always a string, so it is quoted here."""
    out = []
    for item in overrides:
        match = _PATTERN_KEY.match(item)
        out.append(f"{match.group(1)}='{match.group(2).replace(chr(39), chr(92) + chr(39))}'" if match else item)
    return out


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The same config ``launch/train.py`` would build from these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=quote_patterns(overrides))
