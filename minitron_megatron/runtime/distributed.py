"""Start-up from torchrun, SLURM or a single plain process.

This module and `cpu_support` are the only places that touch
`megatron.core.parallel_state` and process-global state.
"""

import contextlib
import datetime
import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from minitron_megatron.runtime import cpu_support
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.parallel_rules import world_problems


def _env_int(*names: str, default: Optional[int] = None) -> Optional[int]:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def _discover_env() -> tuple:
    """(rank, world_size, local_rank, init_method) from torchrun first, then SLURM, else single.

    The rendezvous address is passed to `init_process_group`, never written into os.environ:
    a process that starts a runtime (a test, a notebook) must not hand its port to every
    subprocess it launches later.
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
        return rank, world, local, "env://"  # torchrun, our SLURM scripts
    addr = os.environ.get("MASTER_ADDR") or _slurm_first_host() or "127.0.0.1"
    # A single process picks a free port so that concurrent dry runs do not collide;
    # multi-process launches must agree on one, as torchrun and our SLURM scripts do.
    port = os.environ.get("MASTER_PORT") or str(free_port() if world == 1 else 29500)
    return rank, world, local, f"tcp://{addr}:{port}"


def _slurm_first_host() -> Optional[str]:
    """Node 0 of a SLURM job, so a bare `srun python -m ...` finds its rendezvous host."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist or int(os.environ.get("SLURM_NTASKS", "1")) == 1:
        return None
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    hosts = out.stdout.split()
    return hosts[0] if hosts else None


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available, else cpu; an explicit cuda without CUDA is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r} is not allowed; use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def check_parallel_sizes(world_size: int, tp: int, pp: int, ep: int = 1) -> None:
    problems = world_problems(world_size, tp, pp, ep)
    if problems:
        raise ValueError(problems[0])


def set_seed(seed: int, ctx: ParallelContext) -> None:
    """Seed python/numpy/torch and Megatron's named RNG streams.

    The default stream gets the same seed on every rank so that CPU-initialised
    weights (`use_cpu_initialization`) are identical whatever the TP size.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if ctx.device.type == "cpu":
        tracker = cpu_support.install_rng_tracker()
        tracker.add("data-parallel-rng", seed)
        tracker.add("model-parallel-rng", seed + 2718 + ctx.tp_rank)
        tracker.add("expert-parallel-rng", seed + 1024)
    else:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed=seed, force_reset_rng=True)


def init_runtime(tp: int = 1, pp: int = 1, device: str = "auto", seed: int = 1234, ep: int = 1) -> ParallelContext:
    """Initialise torch.distributed and Megatron's parallel state; return the context.

    `ep`: expert-parallel size of MoE layers, carved out of the data-parallel ranks.
    """
    torch_device = resolve_device(device)
    rank, world, local_rank, init_method = _discover_env()
    check_parallel_sizes(world, tp, pp, ep)
    if torch_device.type == "cpu":
        cpu_support.silence_accelerator_warnings()
        cpu_support.enable()
    else:
        cpu_support.disable()  # a CUDA runtime after a CPU one in the same process
        # Modulo: sites that bind one GPU per task expose a single device to each rank.
        local_device = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(local_device)
        torch_device = torch.device("cuda", local_device)
    from megatron.core import parallel_state as mps  # after cpu_support: it imports Megatron its way

    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if torch_device.type == "cuda" else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=int(os.environ.get("MINITRON_DIST_TIMEOUT_MIN", 30))),
        )
    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    # Experts are never split over TP (expert_tensor_parallel_size=1, Megatron's advice for
    # fine-grained MoE, and what its MoE biases require): an expert's weights are whole on its
    # EP rank, and the importance/trim code indexes experts, not expert shards.
    mps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    ctx = ParallelContext(
        device=torch_device,
        world_size=world,
        rank=rank,
        tp_size=tp,
        tp_rank=mps.get_tensor_model_parallel_rank(),
        pp_size=pp,
        pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_size=mps.get_data_parallel_world_size(),
        dp_rank=mps.get_data_parallel_rank(),
        tp_group=mps.get_tensor_model_parallel_group(),
        pp_group=mps.get_pipeline_model_parallel_group(),
        dp_group=mps.get_data_parallel_group(),
        model_parallel_group=mps.get_model_parallel_group(),
        ep_size=ep,
        ep_rank=mps.get_expert_model_parallel_rank(),
        ep_group=mps.get_expert_model_parallel_group(),
        expert_dp_rank=mps.get_expert_data_parallel_rank(),
        expert_dp_group=mps.get_expert_data_parallel_group(),
    )
    set_seed(seed, ctx)
    _check_collectives(ctx.device)
    return ctx


_guard = contextlib.ExitStack()
"""The collective check of a rehearsal (MINITRON_CHECK_COLLECTIVES=1), for the runtime's life."""


def _check_collectives(device: torch.device) -> None:
    """Under benchmarks/gpu_check.sh --rehearse, every collective of the run refuses a tensor a
    GPU run would hold on the host (runtime/device_guard.py): the fault that ends a first GPU run."""
    from minitron_megatron.runtime import device_guard

    _guard.close()
    if os.environ.get(device_guard.CHECK_ENV) == "1":
        _guard.enter_context(device_guard.host_tensors_guard(device))


def destroy_runtime() -> None:
    from megatron.core import parallel_state as mps

    _guard.close()

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu_support.disable()  # the CPU redirections live as long as the runtime, not the process
