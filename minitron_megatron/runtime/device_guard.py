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
def _checked_collectives(problem):
    """Within the block, every torch.distributed collective first asks `problem(name, tensor)` of
    each tensor it was given and raises CollectiveDeviceError with the message it returns (before
    communicating, so every rank raises, none hangs)."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def guarded(name, collective):
        @functools.wraps(collective)
        def check_then_call(*args, **kwargs):
            for tensor in _tensors([*args, *kwargs.values()]):
                message = problem(name, tensor)
                if message is not None:
                    raise CollectiveDeviceError(message)
            return collective(*args, **kwargs)

        return check_then_call

    for name, collective in originals.items():
        setattr(dist, name, guarded(name, collective))
    try:
        yield
    finally:
        for name, collective in originals.items():
            setattr(dist, name, collective)


def _off_device(device: torch.device):
    def problem(name, tensor):
        if not _on(tensor.device, device):
            return (f"torch.distributed.{name} was given a tensor on {tensor.device}, the run's device is "
                    f"{device}: build it with device=ctx.device (NCCL takes CUDA tensors only)")
        return None

    return problem


@contextlib.contextmanager
def collectives_on(device):
    """Within the block, a torch.distributed collective given a tensor off `device` raises
    CollectiveDeviceError (before communicating, so every rank raises, none hangs)."""
    with _checked_collectives(_off_device(torch.device(device))):
        yield


# ---------------------------------------------------------------- a whole run, rehearsed on CPU

CHECK_ENV = "MINITRON_CHECK_COLLECTIVES"
"""Set to 1 (benchmarks/gpu_check.sh --rehearse does) to run a command under `host_tensors_guard`."""

# Factories that place their result on torch's default device unless given `device=`: the host
# on a GPU machine (Megatron-LM never moves the default device), whatever the run's device.
_FACTORIES = frozenset({"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "rand",
                        "randn", "randint", "randperm", "eye", "scalar_tensor"})


class HostTensors(torch.overrides.TorchFunctionMode):
    """Tracks which tensors a GPU run of the same code would hold on the host.

    On CPU every tensor is on the run's device, so `collectives_on` cannot tell a tensor built
    with `device=ctx.device` from one built without. This mode can: a factory call without
    `device=` (or `.cpu()`) makes a host tensor (`torch.from_numpy` is not seen: torch does not
    route it through function modes); `.to(device)` / `.cuda()`
    makes a device tensor; any other op's results are host tensors when every tensor it was
    given is one (a CPU scalar mixed with a device tensor gives a device tensor, as on CUDA)."""

    def __init__(self):
        super().__init__()
        self._host = {}  # id -> weakref: tensors are compared by identity, never by value

    def is_host(self, tensor: torch.Tensor) -> bool:
        ref = self._host.get(id(tensor))
        return ref is not None and ref() is tensor

    def _mark(self, value, host: bool) -> None:
        import weakref

        for tensor in _tensors([value]):
            key = id(tensor)
            if host:
                self._host[key] = weakref.ref(tensor, lambda _, key=key: self._host.pop(key, None))
            else:
                self._host.pop(key, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = list(_tensors([*args, *kwargs.values()]))
        if name in ("to", "cuda"):
            moved = name == "cuda" or "device" in kwargs or any(
                isinstance(a, (str, torch.device)) or (isinstance(a, torch.Tensor) and a is not args[0])
                for a in args[1:])
            if moved:
                target = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)
                self._mark(out, self.is_host(target) if target is not None else False)
            elif inputs and self.is_host(args[0]):
                self._mark(out, True)  # a dtype cast stays where it was
        elif name == "cpu":
            self._mark(out, True)
        elif name in _FACTORIES and not inputs:
            self._mark(out, "device" not in kwargs)
        elif name.endswith("_") and inputs:
            pass  # in place: the tensor stays where it is
        elif inputs and all(self.is_host(t) for t in inputs):
            self._mark(out, True)
        return out


@contextlib.contextmanager
def host_tensors_guard(device):
    """Within the block, a collective given a tensor that a GPU run would hold on the host (see
    HostTensors), or one off `device`, raises CollectiveDeviceError: the fault NCCL raises on the
    first GPU run, found by a CPU run (benchmarks/gpu_check.sh --rehearse)."""
    mode = HostTensors()
    off_device = _off_device(torch.device(device))

    def problem(name, tensor):
        if mode.is_host(tensor):
            return (f"torch.distributed.{name} was given a tensor built without device= (on a GPU run it is "
                    "on the host: NCCL refuses it); build it with device=ctx.device")
        return off_device(name, tensor)

    with _checked_collectives(problem), mode:
        yield mode
