"""Distill tests: run Triton kernels in its interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported in a process
(`import megatron.core` imports it). Setting it here covers this folder run on
its own and every process the tests spawn; a suite-wide run where another test
imported megatron first still gets interpreted kernels in the spawned workers,
which is where the Triton-on-CPU checks run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
