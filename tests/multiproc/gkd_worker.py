"""Run under torchrun (2 ranks, gloo): GKD's divergence with the vocabulary split over the ranks (as tensor
parallelism splits the output layer) next to the one computed on the gathered vocabulary.

usage: gkd_worker.py <result.json>
For each beta and temperature: every rank draws the same full-vocabulary logits (the last columns -inf, as a
padded vocabulary's), keeps its contiguous shard, and computes the masked-mean divergence and the student's
gradient on the shard (training.gkd_loss with the world as the group); rank 0 compares them with the
whole-vocabulary computation (which tests/test_gkd_loss.py holds equal to TRL's; TRL is not imported here:
its import is most of this job's time). Writes [{"beta", "temperature", "loss_diff", "grad_diff", "loss"}]
from rank 0.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

VOCAB, PAD = 38, 2  # 38 real columns + 2 padding -> 20 per rank


def case(beta, temperature, rank, world):
    import torch
    import torch.distributed as dist

    from megatron_swift.training.gkd_loss import generalized_jsd, masked_mean

    g = torch.Generator().manual_seed(int(beta * 10 + temperature * 100))
    student = torch.randn(2, 6, VOCAB, generator=g) * 2
    teacher = torch.randn(2, 6, VOCAB, generator=g) * 2
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[0, :3] = -100
    pad = torch.full((2, 6, PAD), float("-inf"))
    full_s, full_t = torch.cat([student, pad], -1), torch.cat([teacher, pad], -1)
    width = (VOCAB + PAD) // world
    shard_s = full_s[..., rank * width:(rank + 1) * width].clone().requires_grad_()
    shard_t = full_t[..., rank * width:(rank + 1) * width]
    loss = masked_mean(generalized_jsd(shard_s, shard_t, beta, temperature, group=dist.group.WORLD), labels != -100)
    (grad,) = torch.autograd.grad(loss, shard_s)
    grads = [torch.empty_like(grad) for _ in range(world)]
    dist.all_gather(grads, grad.contiguous())
    gathered = torch.cat(grads, -1)[..., :VOCAB]

    whole_s = full_s.clone().requires_grad_()
    whole = masked_mean(generalized_jsd(whole_s, full_t, beta, temperature), labels != -100)
    (whole_grad,) = torch.autograd.grad(whole, whole_s)
    return {"beta": beta, "temperature": temperature, "loss": loss.item(),
            "loss_diff": abs(loss.item() - whole.item()),
            "grad_diff": (gathered - whole_grad[..., :VOCAB]).abs().max().item()}


def main() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = [case(beta, t, rank, world) for beta in (0.0, 0.5, 1.0) for t in (1.0, 0.8)]
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
