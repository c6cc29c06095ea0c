"""ParallelContext: the one object that carries parallel state through the library."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """Process groups, ranks and sizes of one process.

    Built once by `runtime.init_runtime` (the only place that talks to
    `megatron.core.parallel_state`) and passed explicitly everywhere else.
    """

    device: torch.device
    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    tp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    model_parallel_group: Optional[dist.ProcessGroup] = None
    """tp x pp ranks that hold one full model replica."""
    ep_size: int = 1
    """Expert-parallel size: each EP rank holds num_moe_experts / ep_size experts per MoE layer."""
    ep_rank: int = 0
    ep_group: Optional[dist.ProcessGroup] = None
    expert_dp_rank: int = 0
    """Rank among the replicas of this rank's experts (world / (ep x pp) of them: experts are never
    split over TP)."""
    expert_dp_group: Optional[dist.ProcessGroup] = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that prints summaries and writes run-dir metadata."""
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
