from setuptools import find_packages, setup

setup(
    name="minitron-megatron",
    version="0.1.0",
    description="Minitron pruning + distillation for Megatron-core GPT models, at TP/PP/DP scale",
    python_requires=">=3.10",
    # The YAMLs live in the repository's top-level conf/ and ship inside the package as
    # minitron_megatron/conf/ (found by minitron_megatron.config.files.conf_dir).
    packages=find_packages(include=["minitron_megatron", "minitron_megatron.*"]) + ["minitron_megatron.conf"],
    package_dir={"minitron_megatron.conf": "conf"},
    package_data={"minitron_megatron.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        # Tested at both ends: 0.16.1 (the newest for Python 3.10/3.11) and 0.19.2 (Python 3.12);
        # every difference lives in minitron_megatron/megatron_compat.py. 0.20 is untested.
        "megatron-core>=0.16.1,<0.20",
        "sentencepiece",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3",
        "pyyaml",
        "psutil",  # dist_checkpointing needs it
        "einops",
        "numpy",
        "safetensors",
        "tokenizers",  # Hugging Face tokenizers (data/tokenizer.HFTokenizer; converted models)
        "tqdm",
        "matplotlib",
        "tensorboard",
        "wandb",
    ],
    extras_require={
        # transformers is the reference the convert tests compare with (tiny models built locally);
        # the submitit plugin's schema checks conf/hydra/launcher/submitit_slurm.yaml.
        "test": ["pytest>=8", "pytest-xdist", "transformers>=5", "tokenizers", "hydra-submitit-launcher", "gguf", "accelerate"],
        # convert from_gguf=: transformers loads and dequantises the file (gguf reads it,
        # accelerate is imported by its GGUF path).
        "gguf": ["gguf", "accelerate", "transformers>=5"],
        "triton": ["triton"],
        "slurm": ["hydra-submitit-launcher", "submitit"],
        # Transformer Engine and apex are optional accelerators, used when importable;
        # they come with NVIDIA's NGC PyTorch containers (see docker/).
    },
    entry_points={
        "console_scripts": [
            "minitron-train=minitron_megatron.cli:train",
            "minitron-evaluate=minitron_megatron.cli:evaluate",
            "minitron-prune=minitron_megatron.cli:prune",
            "minitron-distill=minitron_megatron.cli:distill",
            "minitron-run=minitron_megatron.cli:run",
            "minitron-convert=minitron_megatron.cli:convert",
            "minitron-search=minitron_megatron.cli:search",
            "minitron-plan=minitron_megatron.cli:plan",
            "minitron-preprocess=minitron_megatron.data.preprocess:main",
        ]
    },
)
