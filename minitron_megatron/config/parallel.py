"""Parallelism settings shared by every command (DP is what is left of the world size)."""

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: must divide heads, query groups, ffn_hidden_size and padded vocab."""
    pp: int = 1
    """Pipeline-parallel size: stages get num_layers / pp layers (first stage takes the remainder)."""
    ep: int = 1
    """Expert-parallel size (MoE models): each EP rank holds num_moe_experts / ep experts of every
    layer. EP ranks are carved out of the data-parallel ranks, so ep x pp must divide the world size;
    experts are never split over TP (Megatron's expert_tensor_parallel_size=1)."""
    moe_token_dispatcher_type: str = "allgather"
    """How a MoE layer's tokens reach their experts' EP ranks, Megatron's name and values:
    allgather (Megatron's default) or alltoall (the usual choice at EP>1 on GPUs). Both run over
    gloo on the CPU. A run setting, not part of the architecture: any run dir takes either."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside TP regions (needs tp > 1)."""
    pp_layout: Optional[List[int]] = None
    """Explicit layers per pipeline stage, e.g. [2, 1]; None splits as evenly as Megatron allows."""
