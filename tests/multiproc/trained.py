"""What the torchrun test workers share: train as the overrides say, and write a result from one rank."""
import json


def trained(overrides):
    """(config, trainer) after ``trainer.fit()`` for these overrides (the trainer's own set-up)."""
    from megatron_swift.config.compose import compose
    from megatron_swift.training.loop import setup

    cfg = compose(overrides)
    trainer = setup(cfg)
    trainer.fit()
    trainer.sinks.close()
    return cfg, trainer


def write_json(path: str, value, rank: int) -> None:
    """Write ``value`` from global rank ``rank`` (others skip), then wait for every rank."""
    import torch.distributed as dist

    if dist.get_rank() == rank:
        with open(path, "w") as f:
            json.dump(value, f)
    dist.barrier()
