"""Compose the run config from conf/ without the CLI (tests, tools, benchmarks)."""
from __future__ import annotations

import os
from typing import Sequence

from omegaconf import DictConfig

from megatron_swift.config.schema import register

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The same config ``launch/train.py`` would build from these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
