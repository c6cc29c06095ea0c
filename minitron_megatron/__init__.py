"""minitron-megatron: Minitron pruning and distillation for Megatron-core GPT models."""

import warnings

# Megatron-core warns at import time, once per module, that Transformer Engine and
# apex are missing and it falls back to torch; that is the expected set-up on CPU.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine) is not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")

__version__ = "0.1.0"
