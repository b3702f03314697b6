"""What a model family declares: fixed architecture traits plus a table of named sizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class Size:
    """One published (or test) configuration of a family."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: Optional[int] = None
    vocab_size: Optional[int] = None  # None: take the tokenizer's
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    untie_embeddings: bool = True
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: Optional[int] = None
    # False: softmax over the top-k logits, i.e. top-k weights that sum to 1 (HF norm_topk_prob=True);
    # True: top-k of a softmax over all experts, not renormalised (norm_topk_prob=False).
    moe_router_pre_softmax: bool = False


@dataclass(frozen=True)
class Family:
    """Architecture traits shared by every size of a family."""

    name: str
    hf_architectures: Tuple[str, ...]  # the first one is written on export
    hf_model_type: str
    sizes: Dict[str, Size]
    qk_layernorm: bool = False
    add_qkv_bias: bool = False
    moe: bool = False
    # weights(tied=...) -> the HF <-> Megatron weight table (convert.tables); None: not convertible yet.
    weights: Optional[Callable[..., list]] = None

    @property
    def hf_reward_architecture(self) -> str:
        """The HF class of this family's reward models (sequence classification, one label)."""
        return self.hf_architectures[0].replace("ForCausalLM", "ForSequenceClassification")

    def size(self, name: str) -> Size:
        if name not in self.sizes:
            raise KeyError(
                f"model.size={name} is not a size of family {self.name}; choose one of: {', '.join(self.sizes)}"
            )
        return self.sizes[name]
