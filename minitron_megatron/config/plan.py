"""`plan` settings: the per-rank memory of a distillation run, before anything is loaded."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class PlanConfig:
    gpu_memory_gb: float = 80.0
    """Memory of one accelerator in GB (10^9 bytes, as GPU data sheets count: an "80 GB" H100
    has 85.0e9 bytes, of which CUDA, NCCL and the allocator keep a few GB: see `reserve_gb`)."""
    reserve_gb: float = 0.0
    """Subtracted from gpu_memory_gb before `fits` is decided (CUDA context, NCCL buffers,
    allocator fragmentation: typically 3-6 GB on a GPU; 0 plans the tensors alone)."""
    world_size: Optional[int] = None
    """Ranks of the planned run; DP = world_size / (tp x pp). None: use `dp`."""
    dp: int = 1
    """Data-parallel size when world_size is not given."""
    distributed_optimizer: Optional[bool] = None
    """Shard the Adam state (and fp32 main weights) over DP, as Megatron's DistributedOptimizer.
    None: as the distill run resolves distill.optim.use_distributed_optimizer (auto: on when DP > 1)."""
    attention: str = "sdpa"
    """Core attention whose activations are planned: local (Megatron's DotProductAttention: the
    [b, heads/tp, s, s] probabilities are saved, in float32 and, for bf16, again in bf16) or
    sdpa (flash / memory-efficient kernels: q, k, v, output and the log-sum-exp only; also what
    Transformer Engine's fused attention keeps). The default is what model.transformer_impl=auto
    builds on a GPU."""
    recompute: str = "none"
    """none, selective (Megatron's core-attention recompute) or full (each layer's input only)."""
    global_batch_size: Optional[int] = None
    """Samples per optimizer step (None: distill.global_batch_size): with PP > 1 it bounds the
    micro-batches in flight on the first stage (1F1B keeps up to pp of them)."""
