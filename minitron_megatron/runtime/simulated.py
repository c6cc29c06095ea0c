"""One rank of a larger world, simulated in this process: for a planner that builds the model
a real rank would build (Megatron's own GPTModel, its TP/PP sizes) on the meta device.

torch's "fake" process-group backend answers every collective without communicating, so
Megatron's `initialize_model_parallel` lays out its groups for `world_size` ranks in one
process, and a GPTModel built in that state has exactly the shapes and layers of that rank.
Nothing here may run real tensors through a collective: it is for meta-device builds only.
"""

import contextlib

import torch
import torch.distributed as dist

from minitron_megatron.runtime import cpu_support
from minitron_megatron.runtime.context import ParallelContext


def _fake_store():
    # torch's own test utility (the backend "fake" is registered by importing it).
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


def rank_of(tp_rank: int, dp_rank: int, pp_rank: int, tp: int, dp: int) -> int:
    """Megatron's default order tp-cp-ep-dp-pp: TP fastest, then DP, then the pipeline stage."""
    return tp_rank + tp * (dp_rank + dp * pp_rank)


@contextlib.contextmanager
def simulated_rank(tp: int, pp: int, dp: int, pp_rank: int, ep: int = 1):
    """A ParallelContext (device "meta"-safe cpu) of TP rank 0, DP rank 0 of stage `pp_rank`
    in a world of tp x pp x dp ranks; Megatron's parallel state is set up for it and torn down
    on exit. Refuses to start inside a real runtime."""
    from megatron.core import parallel_state as mps

    if dist.is_initialized():
        raise RuntimeError("simulated_rank needs a process without a torch.distributed runtime")
    world = tp * pp * dp
    rank = rank_of(0, 0, pp_rank, tp, dp)
    dist.init_process_group(backend="fake", store=_fake_store(), rank=rank, world_size=world)
    was_enabled = cpu_support.is_enabled()
    cpu_support.enable()
    try:
        mps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                      expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
                                      create_gloo_process_groups=False)
        yield ParallelContext(
            device=torch.device("cpu"), world_size=world, rank=rank,
            tp_size=tp, tp_rank=mps.get_tensor_model_parallel_rank(),
            pp_size=pp, pp_rank=mps.get_pipeline_model_parallel_rank(),
            dp_size=mps.get_data_parallel_world_size(), dp_rank=mps.get_data_parallel_rank(),
            ep_size=ep, ep_rank=mps.get_expert_model_parallel_rank(),
        )
    finally:
        if mps.model_parallel_is_initialized():
            mps.destroy_model_parallel()
        dist.destroy_process_group()
        if not was_enabled:
            cpu_support.disable()
