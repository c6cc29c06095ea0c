"""A check that every tensor handed to a torch.distributed collective is on the run's device.

On CUDA the default process group is NCCL, which takes CUDA tensors only; on CPU it is gloo.
A tensor built without `device=` lands on torch's default device (the CPU), so a collective
on it passes every CPU test and fails on the first GPU run (benchmarks/kd_step.py once
all-reduced its memory peaks that way: every rank raised after the timings).

On CPU the run's device is the default device, so a test makes them differ, as they differ on
a GPU machine: it moves torch's default device to `meta` and lets this guard play NCCL's part,

    with torch.device("meta"), collectives_on(ctx.device):
        code_under_test(ctx)

where a tensor built without `device=ctx.device` is now on `meta` and the collective raises.
Only calls through the `torch.distributed` module's attributes are seen (`dist.all_reduce`,
Megatron's `torch.distributed.all_reduce`), not names imported from it before entry.
"""

import contextlib
import functools

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single")


class CollectiveDeviceError(RuntimeError):
    """A collective was handed a tensor on another device than the run's."""


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _on(tensor_device: torch.device, device: torch.device) -> bool:
    same_index = device.index is None or tensor_device.index is None or device.index == tensor_device.index
    return tensor_device.type == device.type and same_index


@contextlib.contextmanager
def collectives_on(device):
    """Within the block, a torch.distributed collective given a tensor off `device` raises
    CollectiveDeviceError (before communicating, so every rank raises, none hangs)."""
    device = torch.device(device)
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def guarded(name, collective):
        @functools.wraps(collective)
        def check_then_call(*args, **kwargs):
            for tensor in _tensors([*args, *kwargs.values()]):
                if not _on(tensor.device, device):
                    raise CollectiveDeviceError(
                        f"torch.distributed.{name} was given a tensor on {tensor.device}, the run's device is "
                        f"{device}: build it with device=ctx.device (NCCL takes CUDA tensors only)")
            return collective(*args, **kwargs)

        return check_then_call

    for name, collective in originals.items():
        setattr(dist, name, guarded(name, collective))
    try:
        yield
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)
