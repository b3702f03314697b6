# megatron-swift on NVIDIA's PyTorch container, which ships CUDA, NCCL, Transformer Engine and Apex.
#   docker build -t megatron-swift .
#   docker run --gpus all --ipc=host --rm -it -v /data:/data megatron-swift \
#       torchrun --nproc_per_node 8 launch/train.py +model=qwen3 model.pretrained=/data/Qwen3-8B ...
# On SLURM with enroot/pyxis: enroot import dockerd://megatron-swift (or push it to a registry) and pass
# cluster.image=<image or .sqsh> to launch/slurm.py (README, "Clusters").
# megatron-core 0.16 is what this project is tested with (0.17+ needs Python 3.12; see README, Versions).
# Not built in CI (no GPU stack there): the tag is the one the README names; newer 25.xx tags should work.
FROM nvcr.io/nvidia/pytorch:25.04-py3

WORKDIR /workspace/megatron-swift
# bubblewrap: the code-execution reward's isolator (rewards/isolator.py), libseccomp its system-call filter
# (rewards/seccomp.py); setpriv and prlimit come with util-linux.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap util-linux libseccomp2 \
 && rm -rf /var/lib/apt/lists/*
# Dependencies first (cached while only the code changes). torch, TE and Apex come from the image:
# pip must not replace them.
COPY setup.py README.md ./
COPY megatron_swift/__init__.py megatron_swift/__init__.py
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "megatron-core>=0.16.1,<0.17" "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" \
        "safetensors>=0.4" "sentencepiece>=0.2,<0.3" "tokenizers>=0.19" "psutil>=5.9" "wandb>=0.17,<1" \
        "tensorboard>=2.15,<3" "transformers>=4.45" "peft>=0.13"
COPY . .
RUN pip install --no-cache-dir --no-deps -e . && python -c "import megatron_swift, megatron.core, transformer_engine"
ENV PYTHONUNBUFFERED=1
