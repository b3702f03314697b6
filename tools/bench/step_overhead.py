"""Time megatron-swift's training step against a bare megatron-core loop on the same model.

Both loops drive the *same* model, optimizer and layout built by
``training.loop.setup``; they differ only in what surrounds
``forward_backward_func`` + ``optimizer.step``:

* project: ``Trainer.step()`` -- sampler, collation, per-token loss report and its
  DP all-reduce, scheduler, metrics, metrics.jsonl/TensorBoard/console sinks;
* bare: pre-built micro-batches on the device, a minimal forward step and loss,
  ``optimizer.step`` and the scheduler -- the least a megatron-core loop can do.

Blocks of steps alternate (bare, project, bare, ...) so drift affects both
alike; the median block time per step is compared. Prints the ratio
(target: project/bare - 1 under 3 %).

    torchrun --nproc_per_node 2 tools/bench/step_overhead.py +model=qwen3 parallel.tp=2
    torchrun --nproc_per_node 8 tools/bench/step_overhead.py +model=llama model.size=llama3-1b parallel.tp=2 \\
        train.seq_length=4096 train.micro_batch_size=1 train.global_batch_size=64 data=mock
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_swift.config.compose import compose  # noqa: E402


def bare_step(trainer, batches) -> None:
    """What a minimal hand-written megatron-core loop does per step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b.tokens, b.position_ids, None, labels=b.labels)

        def loss_func(output):
            return output.float().sum(), torch.tensor(output.numel(), dtype=torch.int, device=output.device), {}

        return out, loss_func

    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    iterators = [iter(batches) for _ in trainer.model]
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=trainer.model, num_microbatches=len(batches), seq_length=trainer.cfg.train.seq_length,
        micro_batch_size=trainer.cfg.train.micro_batch_size, forward_only=False)
    trainer.optimizer.step()
    trainer.scheduler.step(increment=1)


def main() -> None:
    from megatron_swift.training.loop import setup

    blocks, per_block, warmup = 7, 5, 3
    overrides = sys.argv[1:]
    # One directory all ranks agree on (mkdtemp would differ per rank).
    out = os.path.join(tempfile.gettempdir(), f"swift-bench-{os.environ.get('MASTER_PORT', 'solo')}")
    cfg = compose([*overrides, f"train.train_iters={warmup + 2 * blocks * per_block + 1}",
                   "train.save_at_end=false", "train.save_at_epoch_end=false", "train.save_interval=0",
                   "train.max_epochs=null", f"train.output_dir={out}", "train.resume=none"])
    trainer = setup(cfg)
    trainer.sinks.printer = lambda *_: None  # the console line is still formatted, just not shown
    fixed = trainer._microbatches(trainer.train_data, trainer.sampler, 0)
    for _ in range(warmup):
        trainer.step()
    project, bare = [], []
    for _ in range(blocks):
        for runner, times in ((lambda: bare_step(trainer, fixed), bare), (trainer.step, project)):
            trainer.backend.synchronize()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(per_block):
                runner()
            trainer.backend.synchronize()
            times.append((time.perf_counter() - start) / per_block)
    trainer.sinks.close()
    if dist.get_rank() == 0:
        p, b = statistics.median(project), statistics.median(bare)
        tokens = cfg.train.global_batch_size * cfg.train.seq_length
        print(f"layout tp={cfg.parallel.tp} pp={cfg.parallel.pp} world={dist.get_world_size()} "
              f"device={trainer.backend.device} model={cfg.model.family}-{cfg.model.size}")
        print(f"bare megatron-core step: {b * 1e3:.2f} ms ({tokens / b:,.0f} tokens/s)")
        print(f"megatron-swift step:     {p * 1e3:.2f} ms ({tokens / p:,.0f} tokens/s, "
              f"{trainer.flops_per_step / p / dist.get_world_size() / 1e12:.2f} TFLOP/s/device)")
        print(f"ratio project/bare: {p / b:.4f} (overhead {100 * (p / b - 1):+.2f} %, target < 3 %)")


if __name__ == "__main__":
    main()
