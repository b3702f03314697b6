"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``, with megatron-core's interface.

megatron-core 0.16's local ``DotProductAttention`` materialises the ``s x s``
scores and probabilities of every head (baddbmm, softmax, bmm), which is what
made a GPU step without Transformer Engine half as fast as HF training. This
module takes the same constructor and ``forward`` arguments, so a layer spec
swaps it in for ``core_attention`` (models.attention), and hands the work to
PyTorch's fused kernels:

- causal rows: ``is_causal`` and no mask, so flash / memory-efficient kernels
  on CUDA and the fused flash kernel on CPU run without any ``s x s`` tensor;
- GQA: ``enable_gqa`` lets the kernel read each K/V head for its query group
  instead of repeating K and V ``heads / groups`` times in memory;
- packed rows: on CUDA the varlen flash kernel over the samples' boundaries
  (models.varlen); elsewhere, or with attention dropout, the block-diagonal
  mask of models.attention (True = masked, as megatron-core) becomes SDPA's
  boolean "may attend" mask (CUDA's kernel for masks has no GQA: K/V are
  repeated there);
- dropout on the probabilities inside the kernel, drawn from the tensor-parallel
  RNG tracker as megatron-core's module does (each TP rank holds other heads).

Shapes as in megatron-core: query ``[sq, b, np, hn]``, key/value
``[sk, b, ng, hn]`` (this rank's heads and groups), output ``[sq, b, np * hn]``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_swift.models import varlen


class SDPAttention(MegatronModule):
    """Drop-in for megatron-core's DotProductAttention (same arguments), computed by SDPA."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Optional[ProcessGroupCollection] = None,
                 k_channels: Optional[int] = None, v_channels: Optional[int] = None):
        super().__init__(config=config)
        # Refused here rather than computed differently: validation keeps these off for sdpa.
        # Context parallelism wraps this module (models.ulysses), which gives it a config with cp = 1.
        assert config.context_parallel_size == 1, "SDPAttention sees whole sequences: wrap it with models.ulysses"
        assert config.softmax_type == "vanilla" and config.window_size is None, \
            "model.attention_backend=sdpa supports plain softmax attention over the whole causal window"
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        # k_channels / v_channels: per-head key and value widths where they differ (multi-latent attention).
        k_channels, v_channels = k_channels or config.kv_channels, v_channels or config.kv_channels
        self.hidden_size_per_partition = divide(v_channels * config.num_attention_heads, tp)
        # megatron-core's query-key layer scaling divides and multiplies back by the layer number: net 1.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None, packed_seq_params=None) -> torch.Tensor:
        assert packed_seq_params is None, "packed THD input needs model.attention_backend=te"
        assert attention_bias is None, "model.attention_backend=sdpa takes no attention bias"
        sq, b = query.shape[0], query.shape[1]
        dropout = self.dropout_p if self.training else 0.0
        if attention_mask is not None and query.is_cuda and dropout == 0:
            # Packed rows: the varlen flash kernel where the mask is block-diagonal causal (models.varlen).
            context = varlen.attend(query, key, value, attention_mask, self.softmax_scale)
            if context is not None:
                return context.reshape(sq, b, self.hidden_size_per_partition)
        # [s, b, heads, hn] -> [b, heads, s, hn], the layout SDPA takes.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = self._mask(attention_mask, sq, k.shape[2], q.device)
        gqa = self.heads != self.groups
        if gqa and mask is not None and q.is_cuda:  # CUDA's kernel for masks has no GQA: expand K/V there
            k, v = (t.repeat_interleave(self.heads // self.groups, dim=1) for t in (k, v))
            gqa = False
        with self._dropout_rng(dropout):
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                     scale=self.softmax_scale, enable_gqa=gqa)
        # [b, heads, sq, hn] -> [sq, b, heads * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _mask(self, attention_mask: Optional[torch.Tensor], sq: int, sk: int, device):
        """(SDPA boolean mask or None, is_causal). megatron-core's masks say where attention is forbidden."""
        if attention_mask is not None:
            return ~attention_mask, False
        if self.attn_mask_type == AttnMaskType.no_mask:
            return None, False
        if sq == sk:
            return None, True
        # Queries are the last sq of sk positions (decoding with a cache): causal aligned to the end.
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
        return allowed, False

    def _dropout_rng(self, dropout: float):
        """Dropout draws from the tensor-parallel RNG stream unless sequence parallelism makes the inputs
        differ per rank already (megatron-core's DotProductAttention does the same)."""
        if dropout > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

