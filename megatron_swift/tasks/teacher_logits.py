"""GKD's teacher on a tensor-parallel size of its own: its logits for this rank's rows, on the student's
vocabulary shard.

The ranks of one teacher tensor-parallel group may hold different rows (e.g. student TP=1 with DP=2, teacher
TP=2 over the same two ranks), so the group first gathers the rows of each distinct data-parallel rank among
its members (token ids only) and runs the teacher once on all of them. Each member then holds the teacher's
logits of those rows on its teacher vocabulary shard. Every member needs its own rows on its student vocabulary
shard: each pair of members exchanges the rectangle where the sender's teacher shard and the receiver's
student shard overlap (point-to-point, within the teacher's group). No rank ever holds more than its teacher
shard of the group's rows and its student shard of its own rows; padding columns of the student's vocabulary
are -inf, as its own output layer makes them (models/vocab_mask.py).

Needs parallel.pp = 1 and cp = 1 (the teacher's group then spans whole student data-parallel rows).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import List

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_swift.backend import collective_device
from megatron_swift.training.forward_only import collect


class TeacherOnOwnLayout:
    def __init__(self, chunks, layout, vocab_size: int, student_padded: int, teacher_padded: int, forward):
        self.chunks, self.layout, self.forward = chunks, layout, forward
        self.vocab_size = vocab_size
        self.group, self.ranks = layout.tp_group, layout.tp_ranks
        self.student_local = student_padded // ps.get_tensor_model_parallel_world_size()
        self.teacher_local = teacher_padded // layout.tp
        # (student data-parallel rank, student tensor-parallel rank) of each member of the teacher's group
        me = torch.tensor([ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank()],
                          device=collective_device())
        members = [torch.zeros_like(me) for _ in self.ranks]
        dist.all_gather(members, me, group=self.group)
        members = [tuple(int(x) for x in m.tolist()) for m in members]
        self.sources = list(dict.fromkeys(dp for dp, _ in members))  # distinct rows, in member order
        self.row_source = [self.sources.index(dp) for dp, _ in members]  # each member's block of rows
        self.student_tp = [tp for _, tp in members]
        self.me = self.ranks.index(dist.get_rank())

    def logits(self, batches, seq_length: int, micro_batch_size: int) -> List[torch.Tensor]:
        """Per batch: the teacher's logits [rows, seq, student vocabulary shard] of this rank's rows."""
        joined = [self._group_rows(batch) for batch in batches]
        with self.layout.active():
            outs = collect(self.chunks, joined, self.forward, lambda batch, out: out.detach(), seq_length,
                           micro_batch_size * len(self.sources))
        return [self._to_student_shard(out, batch.tokens.shape[0]) for out, batch in zip(outs, batches)]

    def _group_rows(self, batch):
        """The rows of every distinct data-parallel rank in the teacher's group, concatenated in source order."""
        def gathered(x):
            device = collective_device()
            parts = [torch.empty_like(x, device=device) for _ in self.ranks]
            dist.all_gather(parts, x.to(device).contiguous(), group=self.group)
            firsts = [self.row_source.index(s) for s in range(len(self.sources))]
            return torch.cat([parts[m] for m in firsts]).to(x.device)

        return SimpleNamespace(tokens=gathered(batch.tokens), position_ids=gathered(batch.position_ids))

    def _columns(self, sender: int, receiver: int):
        """Global vocabulary columns [lo, hi) that ``sender``'s teacher shard gives ``receiver``'s student shard."""
        t0 = sender * self.teacher_local
        s0 = self.student_tp[receiver] * self.student_local
        return max(t0, s0), min(t0 + self.teacher_local, s0 + self.student_local, self.vocab_size)

    def _to_student_shard(self, out: torch.Tensor, rows: int) -> torch.Tensor:
        """Redistribute the group's [all rows, seq, teacher shard] logits to [my rows, seq, my student shard]."""
        device = collective_device()
        out = out.to(device)
        mine = torch.full((rows, out.shape[1], self.student_local), float("-inf"), dtype=out.dtype, device=device)
        base = self.student_tp[self.me] * self.student_local
        ops, received = [], []
        for peer, rank in enumerate(self.ranks):
            # what I send to peer: its rows, the columns my teacher shard has of its student shard
            lo, hi = self._columns(self.me, peer)
            if hi > lo:
                r0 = self.row_source[peer] * rows
                piece = out[r0:r0 + rows, :, lo - self.me * self.teacher_local:hi - self.me * self.teacher_local]
                if peer == self.me:
                    mine[..., lo - base:hi - base] = piece
                else:
                    ops.append(dist.P2POp(dist.isend, piece.contiguous(), rank, self.group))
            # what I receive from peer: my rows, the columns its teacher shard has of my student shard
            lo, hi = self._columns(peer, self.me)
            if hi > lo and peer != self.me:
                buf = torch.empty((rows, out.shape[1], hi - lo), dtype=out.dtype, device=device)
                ops.append(dist.P2POp(dist.irecv, buf, rank, self.group))
                received.append((buf, lo - base))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        for buf, at in received:
            mine[..., at:at + buf.shape[-1]] = buf
        return mine
