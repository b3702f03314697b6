"""Run under torchrun: the trainer's first-step loss and gradient, with the global batch cut into micro-batches
of several sizes, and the same figures computed here by hand over the whole global batch.

usage: grad_worker.py <result.json> <mbs>[,<mbs>...] <override> [<override> ...]

The overrides must give TP=PP=1 (each rank runs the whole model), train.lr=0 and train.min_lr=0 (a step then
leaves the weights as they are, so every split sees the same model; for DPO the policy stays equal to its
reference) and train.clip_grad=0 (the gradient buffers keep the unclipped gradient).

By hand (no schedule, no loss_func of the project, no data-parallel reduction): every rank runs the whole global
batch of step 1 through the model at once, and autograd differentiates
- task=lm: the mean token loss over every loss-carrying token of the global batch;
- task=dpo (sigmoid loss, no smoothing): the mean over the pairs of -log sigmoid(beta * (m - m_ref)), m the
  chosen-minus-rejected summed completion log-probability; policy = reference, so m_ref is m itself, detached.
The trainer then takes its step 1 once per micro-batch size (a new DataParallelSampler as setup builds it).

Writes, from the last rank: {"hand": {"loss", "grad_norm"},
"steps": {mbs: {"loss", "grad_norm", "max_grad_diff"}}}, where "grad_norm" of a step is the figure
train_step returns (the one logged) and "max_grad_diff" is max |trainer's gradient - hand gradient| over all
parameters, with "hand_max_grad" the largest |hand gradient| for scale.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def hand_loss(task_name, beta, model, batch):
    import torch.nn.functional as F

    token_losses = model(batch.tokens, batch.position_ids, attention_mask=None, labels=batch.labels).float()
    mask = batch.loss_mask.float()
    if task_name == "lm":
        return (token_losses * mask).sum() / mask.sum()
    assert task_name == "dpo"
    logps = -(token_losses * mask).sum(-1)
    pairs = logps.shape[0] // 2  # rows: every pair's chosen, then every pair's rejected
    margin = logps[:pairs] - logps[pairs:]
    return (-F.logsigmoid(beta * (margin - margin.detach()))).mean()


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_swift.config.compose import compose
    from megatron_swift.data.sampler import DataParallelSampler
    from megatron_swift.training.loop import setup
    from tests.multiproc.trained import write_json

    result_file, sizes, overrides = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], sys.argv[3:]
    cfg = compose(overrides)
    assert cfg.train.lr == 0 and cfg.train.min_lr == 0 and cfg.train.clip_grad == 0
    assert cfg.parallel.tp == cfg.parallel.pp == 1
    trainer = setup(cfg)
    (ddp,) = trainer.model
    model = ddp.module
    params = [p for p in model.parameters() if p.requires_grad]
    data, device = trainer.train_data, trainer.backend.torch_device

    first = trainer.sampler.global_batch(0)  # does not depend on the micro-batch size
    batch = data.collate([data[int(i)] for i in first]).to(device)
    loss = hand_loss(cfg.task.name, getattr(cfg.task, "beta", None), model, batch)
    hand = torch.autograd.grad(loss, params)
    result = {"hand": {"loss": loss.item(), "grad_norm": torch.sqrt(sum((g.double() ** 2).sum() for g in hand)).item(),
                       "hand_max_grad": max(g.abs().max().item() for g in hand)},
              "row_tokens": batch.loss_mask.sum(-1).tolist(), "steps": {}}

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    for mbs in sizes:
        trainer.sampler = DataParallelSampler(len(data), cfg.train.global_batch_size, mbs, dp, rank, cfg.train.seed,
                                              cfg.data.shuffle)
        trainer.cfg.train.micro_batch_size = mbs
        if hasattr(trainer.task, "micro_batch_size"):
            trainer.task.micro_batch_size = mbs
        figures, grad_norm, lr, skipped = trainer.train_step(0)
        assert lr == 0 and not skipped
        diff = max((p.main_grad.float() - g).abs().max().item() for p, g in zip(params, hand))
        result["steps"][mbs] = {"loss": figures["loss"], "grad_norm": float(grad_norm), "max_grad_diff": diff,
                                "microbatches": trainer.sampler.num_microbatches}
    write_json(result_file, result, rank=dist.get_world_size() - 1)


if __name__ == "__main__":
    main()
