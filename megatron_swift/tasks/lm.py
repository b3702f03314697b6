"""Next-token cross-entropy: pretraining and SFT (the data's loss mask says which tokens count)."""
from __future__ import annotations

from typing import Dict, List

from megatron_swift.tasks.base import register
from megatron_swift.tasks.configs import LMConfig
from megatron_swift.tasks.reports import mtp_losses, reduce_reports
from megatron_swift.training.forward_step import make_forward_step


@register
class LMTask:
    name = "lm"
    config = LMConfig
    rows_per_sample = 1  # rows of seq_length the model runs per sample
    forward_passes = 1.0  # model forward+backward passes per row, for FLOP counting
    head = "lm"  # the model's output layer (models.builder)
    read_data = None  # rows come from the data.source readers (data.sources)
    takes_images = True  # data=vl_sft rows

    def __init__(self, packed_format: str):
        self.packed_format = packed_format

    @classmethod
    def validate(cls, cfg, problems: List[str]) -> None:
        """Any data source, packing and streaming: nothing to check."""

    @classmethod
    def build(cls, cfg, backend, arch, padded_vocab: int, datasets=(), output_dir: str = ".",
              model=None) -> "LMTask":
        return cls(backend.packed_format)

    def forward_step(self):
        return make_forward_step(self.packed_format)

    def prepare(self, batches, dataset=None) -> None:
        """Nothing to compute before the policy's forward/backward."""

    def metrics(self, reports: List[dict], device) -> Dict[str, float]:
        out = reduce_reports(reports, device)
        out["loss"] = out.pop("lm loss")
        out.update(mtp_losses(len(reports), device))  # models with MTP layers: their loss, on its own
        return out
