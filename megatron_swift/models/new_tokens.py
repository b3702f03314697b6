"""model.new_tokens: special tokens a checkpoint does not have, their embedding and output rows.

- The tokenizer gets each token as a special, never-split token (data/tokenizer.py, for HF, SentencePiece and
  byte tokenizers); a token it already encodes as one id is reused, with a printed line.
- The vocabulary grows to hold the new ids (the TP padding is recomputed from the grown size by the caller);
  loading zero-pads rows past the checkpoint's (convert/rules.Direct), and the new rows are then set here:
  ``mean`` of the rows of the tokens the tokenizer already had (what transformers' resize_token_embeddings
  centres on), ``text`` (the mean of the rows of model.new_token_init_text's tokens, one text per token), or an
  init strategy (models/init_strategy.py: the whole [vocab, hidden] matrix generated, the new rows taken).
  Every rank computes the same values from its TP shard plus one all-reduce, so the rows do not depend on the
  layout, and a tied output layer's copy on the last pipeline stage gets the embedding's values.
- With LoRA or a frozen embedding, the embedding (and an untied output layer) train their new rows only:
  ``train_new_rows_only`` marks them, the optimizer step zeroes the other rows' gradients
  (``install_row_masks``) and they get no weight decay (training/optim.py), so old rows stay bitwise unchanged
  (Adam's moments of a row that only ever had zero gradients are zero, and its update 0 / (0 + eps) = 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_EMBEDDING, _OUTPUT = "embedding.word_embeddings.weight", "output_layer.weight"


@dataclass
class NewTokens:
    tokens: List[str] = field(default_factory=list)
    ids: List[int] = field(default_factory=list)
    added: List[bool] = field(default_factory=list)  # False: the tokenizer had it (reused)
    known: int = 0  # tokens the tokenizer had before: the rows ``mean`` averages
    text_ids: List[List[int]] = field(default_factory=list)  # ``text``: the ids of each token's text

    @property
    def rows(self) -> List[int]:
        """Ids whose rows are new (the reused tokens keep theirs)."""
        return [i for i, new in zip(self.ids, self.added) if new]

    def grow(self, vocab: int) -> int:
        """The model's vocabulary with room for every new id."""
        return max([vocab] + [i + 1 for i in self.ids])


def add_to_tokenizer(tokenizer, model_cfg, say: Callable[[str], None]) -> NewTokens:
    """Add model.new_tokens to ``tokenizer`` (in place); texts for ``text`` are encoded before, with the
    tokenizer's own tokens."""
    tokens = list(model_cfg.new_tokens)
    if not tokens:
        return NewTokens()
    new = NewTokens(tokens=tokens, known=tokenizer.vocab_size)
    if model_cfg.new_token_init == "text":
        new.text_ids = [tokenizer.encode_with_offsets(text)[0] for text in model_cfg.new_token_init_text]
    for token in tokens:
        ids = tokenizer.encode_with_offsets(token)[0]
        if len(ids) == 1:
            say(f"megatron-swift: model.new_tokens: {token!r} is already token {ids[0]} of the tokenizer: reused, "
                "its row kept")
            new.ids.append(ids[0])
            new.added.append(False)
        else:
            new.ids.append(tokenizer.add_special_tokens([token])[0])
            new.added.append(True)
    return new


def _vocab_params(chunks, head: str):
    """(name, parameter, key) of the embedding and the LM output layer held by this rank; ``key`` names the
    matrix the values belong to (a tied output layer's copy is the embedding)."""
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if name.endswith(_EMBEDDING):
                yield name, param, "embedding"
            elif name.endswith(_OUTPUT) and head == "lm":
                yield name, param, "embedding" if getattr(param, "shared_embedding", False) else "output"


def _local_rows(param) -> range:
    """The global vocabulary rows this TP rank's shard holds (embedding and output layer split rows over TP)."""
    start = ps.get_tensor_model_parallel_rank() * param.shape[0]
    return range(start, start + param.shape[0])


def _row_means(param, groups: List[List[int]]) -> torch.Tensor:
    """[len(groups), hidden]: the mean of the rows of each id list (with repeats), over the whole TP matrix."""
    local = _local_rows(param)
    sums = torch.zeros(len(groups), param.shape[1], dtype=torch.float64, device=param.device)
    for k, ids in enumerate(groups):
        mine = [i - local.start for i in ids if i in local]
        if mine:
            sums[k] = param.detach()[torch.tensor(mine, device=param.device)].double().sum(0)
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sums, group=ps.get_tensor_model_parallel_group())
    return sums / torch.tensor([max(len(ids), 1) for ids in groups], dtype=torch.float64,
                               device=param.device).unsqueeze(1)


def init_rows(chunks, new: NewTokens, how: str, arch, seed: int, std: float) -> List[str]:
    """Set the new tokens' rows of the embedding and output layer; returns what was set, for the start line."""
    from megatron_swift.models.init_strategy import generate

    rows = new.rows
    if not rows:
        return []
    done = []
    for name, param, key in _vocab_params(chunks, arch.head):
        if how == "mean":
            values = _row_means(param, [list(range(new.known))]).expand(len(rows), -1)
        elif how == "text":
            by_token = dict(zip(new.ids, new.text_ids))
            values = _row_means(param, [by_token[i] for i in rows])
        else:  # a strategy: the whole real-vocabulary matrix, seeded by which matrix it is
            values = generate(how, (arch.vocab_size, param.shape[1]), f"new_rows:{key}", seed, std)[rows]
        local = _local_rows(param)
        with torch.no_grad():
            for value, row in zip(values, rows):
                if row in local:
                    param[row - local.start] = value.to(param.dtype)
        done.append(f"{'output' if key == 'output' else 'embedding'} rows {_spans(rows)} ({how})")
    return sorted(set(done))


def reference_rows(chunks, cfg, arch) -> None:
    """A frozen reference model loaded from HF weights (tasks/reference.py) gets the new rows the policy started
    with: the same tokens added to the run's tokenizer, the same init (deterministic: means of the same loaded
    rows, or the same seeded draw)."""
    if not cfg.model.new_tokens:
        return
    from megatron_swift.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(cfg.data.tokenizer or cfg.model.pretrained or cfg.model.llm or "byte")
    new = add_to_tokenizer(tokenizer, cfg.model, lambda line: None)
    with torch.no_grad():
        init_rows(chunks, new, cfg.model.new_token_init, arch, cfg.train.seed, cfg.model.init_method_std)


def _spans(ids: List[int]) -> str:
    """1,2,3,7 -> '1-3, 7'."""
    out, ids = [], sorted(ids)
    start = prev = ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def train_new_rows_only(chunks, new: NewTokens, head: str) -> List[str]:
    """A frozen embedding / output layer (LoRA, train.freeze) trains the new rows anyway, and only them."""
    rows = set(new.rows)
    opened = []
    for name, param, _ in _vocab_params(chunks, head):
        if not rows or param.requires_grad:
            continue
        local = _local_rows(param)
        param.requires_grad_(True)
        param.new_rows_only = True  # training/optim.py: no weight decay
        param.row_mask = torch.tensor([r in rows for r in local], device=param.device)
        opened.append(name)
    return opened


def install_row_masks(optimizer, model) -> None:
    """Zero the gradients of the rows a ``train_new_rows_only`` parameter does not train, before each step
    (after the data-parallel reduction, and the embedding / tied-output sum across pipeline stages)."""
    params = [p for chunk in model for p in chunk.parameters() if getattr(p, "new_rows_only", False)]
    if not params:
        return
    step = optimizer.step

    def masked_step(*args, **kwargs):
        for param in params:
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                grad[~param.row_mask] = 0
        return step(*args, **kwargs)

    optimizer.step = masked_step
