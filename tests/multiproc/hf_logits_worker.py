"""Run under torchrun: build the model through the trainer's own setup (model.pretrained or model.load),
push fixed tokens through megatron-core's forward-only schedule, save full-vocabulary logits.

usage: hf_logits_worker.py <tokens.pt> <out.pt> <override> [<override> ...] [--also=<hf folder>,<out.pt> ...]

--also: after the trainer's own model, more HF folders (of any family) under the same layout, each built and
loaded as model.pretrained=<folder> would be, in the same processes (one launch for several models: CI time).

--then=<name>:<override>,<override>...: afterwards, megatron-core's parallel groups are rebuilt in the same
processes with these parallel.* overrides, and every model (the trainer's and --also's) is built and loaded
again under them; its logits go to <out without .pt>.<name>.pt. Several --then run in order.
--save=<name>: the models built under layout <name> (a --then name, or "first") are also written as weights-only
checkpoints, each in the run folder <out without .pt>.ckpt (HF -> Megatron, for round-trip tests).
--mtp=<out.pt>: the multi-token-prediction head too (one pipeline stage): the output head's full-vocabulary
logits of the first MTP layer's hidden states, [b, s, padded V], of the trainer's model in <out.pt> and of each
--also model in its <out without .pt>.mtp.pt.
"""
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "convert"))


def main() -> None:
    import torch
    import torch.distributed as dist
    from check import megatron_logits

    from megatron_swift.config.compose import compose
    from megatron_swift.models.arch import padded_vocab_size
    from megatron_swift.training.loop import setup

    tokens_file, out_file, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    overrides = [a for a in args if not a.startswith("--")]
    also = [a[len("--also="):].split(",") for a in args if a.startswith("--also=")]
    then = [a[len("--then="):].split(":", 1) for a in args if a.startswith("--then=")]
    save = [a[len("--save="):] for a in args if a.startswith("--save=")]
    mtp = [a[len("--mtp="):] for a in args if a.startswith("--mtp=")]
    cfg = compose(overrides)
    first_folder = cfg.model.pretrained
    trainer = setup(cfg)
    tokens = torch.load(tokens_file, weights_only=True)
    first = (trainer.model, trainer.arch,
             padded_vocab_size(trainer.arch.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp))
    models = [(out_file, lambda: first)]
    models += [(out, lambda folder=folder: _load(trainer, cfg, folder)) for folder, out in also]
    _run(models, trainer, cfg, tokens, "first" in save, megatron_logits,
         [mtp[0]] + [out[:-len(".pt")] + ".mtp.pt" for _, out in also] if mtp else None)
    for name, layout in then:
        _relayout(cfg, layout.split(","))
        stem = lambda out: out[:-len(".pt")] if out.endswith(".pt") else out  # noqa: E731
        models = [(f"{stem(out)}.{name}.pt", lambda folder=folder: _load(trainer, cfg, folder))
                  for folder, out in [(first_folder, out_file)] + also]
        _run(models, trainer, cfg, tokens, name in save, megatron_logits)
    dist.barrier()


def _run(models, trainer, cfg, tokens, save: bool, megatron_logits, mtp_outs=None) -> None:
    """Each model's logits into its file (and, with ``save``, its weights into <file>.ckpt; with ``mtp_outs``,
    its MTP head's logits into those files)."""
    import torch
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf

    from megatron_swift.training import checkpoint as ckpt
    from megatron_swift.training.loop import model_meta

    for i, (out, model) in enumerate(models):
        chunks, arch, padded = model()
        logits = megatron_logits(SimpleNamespace(model=chunks, backend=trainer.backend), tokens)
        if mtp_outs:
            _mtp_logits(chunks[-1], tokens, mtp_outs[i])
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save(logits, out)
        if save:
            ckpt.save_weights(out[:-len(".pt")] + ".ckpt", chunks, OmegaConf.to_yaml(cfg),
                              model_meta(arch, arch.vocab_size, padded))


def _mtp_logits(chunk, tokens, out: str) -> None:
    """The first MTP layer's logits: GPTModel runs its MTP block when given labels and a loss mask (its output, the main and
    each MTP layer's hidden states stacked along the sequence, is caught by a hook), then the shared head."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    while not hasattr(chunk, "mtp"):  # inside megatron-core's DDP (and Float16Module) wrappers
        chunk = chunk.module
    captured = {}
    handle = chunk.mtp.register_forward_hook(lambda module, inputs, output: captured.setdefault("h", output))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        chunk(tokens, positions, None, labels=tokens, loss_mask=torch.ones_like(tokens))
        handle.remove()
        s = tokens.shape[1]
        weight = chunk.shared_embedding_or_output_weight() if chunk.share_embeddings_and_output_weights else None
        logits, _ = chunk.output_layer(captured["h"][s:2 * s], weight=weight)
        logits = gather_from_tensor_model_parallel_region(logits).transpose(0, 1).float()
    if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(logits, out)


def _relayout(cfg, overrides) -> None:
    """megatron-core's parallel groups rebuilt in these processes for the parallel.* ``overrides``."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from omegaconf import OmegaConf

    for item in overrides:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, value)
    par = cfg.parallel
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=par.tp, pipeline_model_parallel_size=par.pp,
                                 expert_model_parallel_size=par.ep, expert_tensor_parallel_size=par.etp)
    model_parallel_cuda_manual_seed(cfg.train.seed)


def _load(trainer, cfg, folder: str) -> list:
    """The model chunks of HF ``folder`` under the trainer's layout, built and loaded as setup() does."""
    import dataclasses

    from omegaconf import OmegaConf

    from megatron_swift.convert.hf_config import read_hf_config
    from megatron_swift.models.families import hf_family_name
    from megatron_swift.convert.hf_load import load_hf_weights
    from megatron_swift.models.arch import padded_vocab_size, resolve
    from megatron_swift.models.builder import build_model, transformer_config

    OmegaConf.update(cfg, "model.pretrained", folder)
    OmegaConf.update(cfg, "model.family", hf_family_name(read_hf_config(folder), folder))  # its own family
    arch = dataclasses.replace(resolve(cfg.model), head=trainer.arch.head)
    padded = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp)
    chunks = build_model(arch, transformer_config(arch, cfg, trainer.backend, initialize=False), padded,
                         cfg.train.seq_length, trainer.backend)
    load_hf_weights(chunks, folder, arch, padded)
    return chunks, arch, padded


if __name__ == "__main__":
    main()
