"""Run under torchrun: a vision encoder (models/vision.py) split over the tensor-parallel ranks, loaded from an
HF folder; rank 0 saves its features.

usage: vision_worker.py <hf folder> <pixels.pt> <feature layer> <out.pt>
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_swift.backend import cpu_compat
    from megatron_swift.convert.hf_load import load_vision_weights
    from megatron_swift.models.vision import build_vision_model, vision_arch, vision_config

    folder, pixels_file, layer, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cpu_compat.apply()
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(dist.get_world_size(), 1)
    model_parallel_cuda_manual_seed(0)
    with open(os.path.join(folder, "config.json")) as f:
        arch = vision_arch(json.load(f), layer)
    model = build_vision_model(arch, vision_config(arch, use_cpu_initialization=True,
                                                   tensor_model_parallel_size=dist.get_world_size())).eval()
    load_vision_weights(model, folder, arch)
    with torch.no_grad():
        features = model(torch.load(pixels_file, weights_only=True))
    if dist.get_rank() == 0:
        torch.save(features, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
