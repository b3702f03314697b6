"""A frozen model of any supported family from an HF folder, next to the trained one: the judge reward's
model (rewards/judge_model.py) and GKD's teacher (tasks/teacher.py). Its architecture comes from its own
config.json (none of the trained model's ``model.*`` settings apply); it is built on megatron-core under the
run's layout, or under the process groups of another one (backend/layouts.py) when it has its own."""
from __future__ import annotations

import contextlib
from typing import List, Optional

from omegaconf import OmegaConf


def arch_from_folder(folder: str):
    """The architecture of the model in ``folder`` from its config.json alone."""
    from megatron_swift.config.schema import ModelConfig
    from megatron_swift.convert.hf_config import read_hf_config
    from megatron_swift.models.arch import resolve
    from megatron_swift.models.families import hf_family_name

    family = hf_family_name(read_hf_config(folder), folder)
    return resolve(OmegaConf.structured(ModelConfig(family=family, pretrained=folder)))


def _config_on(cfg, layout):
    """``cfg`` with the parallel settings of ``layout`` (tensor parallelism only) for the frozen model."""
    if layout is None:
        return cfg
    return OmegaConf.merge(cfg, {"parallel": {"tp": layout.tp, "pp": 1, "vpp": None, "sp": False, "cp": 1,
                                              "ep": 1, "etp": None}})


def build_frozen(cfg, backend, arch, folder: str, padded_vocab: int, seq_length: int, layout=None) -> List:
    """Frozen chunks of ``arch`` with the weights of ``folder``, on ``layout`` (None: the run's)."""
    from megatron_swift.convert.hf_load import load_hf_weights
    from megatron_swift.models.builder import build_model, transformer_config
    from megatron_swift.training.optim import frozen_model

    with layout.active() if layout is not None else contextlib.nullcontext():
        tconfig = transformer_config(arch, _config_on(cfg, layout), backend, initialize=False)
        chunks = build_model(arch, tconfig, padded_vocab, seq_length, backend)
        load_hf_weights(chunks, folder, arch, padded_vocab)
        return frozen_model(chunks, tconfig)


def layout_for(tp: Optional[int], run_tp: int, timeout_minutes: int):
    """A layout of its own for a frozen model asking for tensor-parallel size ``tp``; None: the run's."""
    from megatron_swift.backend.layouts import Layout

    return None if tp in (None, run_tp) else Layout(tp, timeout_minutes)
