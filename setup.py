"""megatron-swift: HF checkpoint in, Megatron-Core training at scale, HF checkpoint out."""
from setuptools import find_packages, setup

setup(
    name="megatron-swift",
    version="0.1.0",
    description="Megatron-Core based trainer for large language models, driven by Hydra configs",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_swift", "megatron_swift.*"]),
    package_data={"megatron_swift": ["assets/*", "assets/vl_shapes/*.jsonl", "assets/vl_shapes/images/*.png"]},
    install_requires=[
        # torch is deliberately not upper-bounded tightly; CI installs the CPU build 2.13.0 first.
        "torch>=2.4,<2.15",
        # 0.17+ needs Python 3.12; GPU users on 3.12 may try newer releases (see README).
        "megatron-core>=0.16.1,<0.17",
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3,<2.4",
        "numpy>=1.24,<3",
        "safetensors>=0.4,<1",
        "sentencepiece>=0.2,<0.3",
        "tokenizers>=0.19,<1",
        "psutil>=5.9",
        "wandb>=0.17,<1",
        "tensorboard>=2.15,<3",
    ],
    extras_require={
        # Transformer Engine builds only against CUDA; NGC PyTorch containers ship it (and Apex).
        "te": ["transformer-engine[pytorch]>=2.0"],
        # GRPO's accuracy reward verifies math answers with it (falls back to a normalised exact match).
        "rl": ["math-verify>=0.7,<1"],
        # Vision-language models: the encoders' image processors (transformers, on PIL) and the VL demo tools.
        "vl": ["transformers>=4.45", "pillow>=9"],
        # Video rows of vision-language SFT (Qwen2.5-VL): PyAV decodes the files (data/videos.py).
        "video": ["av>=12"],
        # scikit-learn ships two real JPEGs (china.jpg, flower.jpg) the vision tests use; trl's own CPO/ORPO/GKD
        # loss functions are the ground truth of tests/test_reference_free_losses.py (pulls datasets/pandas/pyarrow).
        # pytest-xdist: the suite's two workers (README's test command).
        "test": ["pytest>=8", "pytest-xdist>=3.8", "transformers>=4.45", "pillow>=9", "peft>=0.15",
                 "math-verify>=0.7,<1", "scikit-learn>=1.3", "trl>=1.0,<2", "av>=12"],
    },
)
