"""Process start-up: torch.distributed, Megatron model-parallel state, device, CPU support."""

from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.distributed import destroy_runtime, init_runtime

__all__ = ["ParallelContext", "init_runtime", "destroy_runtime"]
