"""minitron-megatron: Minitron pruning and distillation for Megatron-core GPT models."""

import warnings

# Megatron-core warns at import time, once per module, that Transformer Engine and
# apex are missing and it falls back to torch; that is the expected set-up on CPU.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine) is not installed.*")
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
# torch deprecations triggered inside Megatron's dist_checkpointing, not by our code.
warnings.filterwarnings("ignore", message=".*`load_state_dict` is deprecated.*", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*", category=FutureWarning)

__version__ = "0.1.0"
