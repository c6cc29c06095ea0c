"""Suite-wide set-up. Triton runs kernels in its interpreter on CPU-only machines:
TRITON_INTERPRET must be set before triton is first imported (megatron.core imports it)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
