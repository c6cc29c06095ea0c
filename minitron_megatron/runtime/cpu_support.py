"""Megatron-core on CPU: for dry runs, laptops, CI and tests on small models.

Megatron-core assumes CUDA in a handful of places on the GPT path we use
(verified on megatron-core 0.16.1, see shared/ENVIRONMENT.md):

1. `torch.cuda.current_device()` picks the device of rotary frequencies, pipeline
   p2p buffers and DDP grad buffers;
2. the CUDA RNG tracker forks the CUDA generator around dropout and seeding;
3. literal `device="cuda"` factories and `tensor.cuda()` (schedules' token counters, the optimizer's
   found-inf/scale tensors, gradient clipping);
4. `torch.cuda.synchronize()` in pipeline p2p;
5. type-name checks such as `assert grad.type() == "torch.cuda.FloatTensor"` in
   gradient clipping (found on 0.16.1, not in ENVIRONMENT.md's list);
6. `torch.cuda.current_stream()` waited on before the DDP grad reduce (megatron-core
   0.19's `param_and_grad_buffer.start_grad_sync`, for CUDA-graph replays): on the
   CPU there is one stream, so a stream that waits on nothing stands in;
7. the MoE `alltoall` token dispatcher (0.16 and 0.19) creates a `torch.cuda.Stream` in its
   constructor, copies its split sizes to the host on it (`with torch.cuda.stream(...)`) and
   waits on an event it records there: host streams, a no-op stream context and events that
   are already complete stand in. Its host copy (`maybe_move_tensor_to_cpu`) is also where its
   split sizes become numpy arrays, the sequences `all_to_all_single` accepts; it skips tensors
   that are already on the host, so on the CPU the conversion is done for it;
8. activation recomputation (`recompute_granularity`: Megatron's `CheckpointFunction`) saves
   the CUDA generator's state beside the CPU one and the tracker's, and restores all three
   before recomputing: on the CPU there is no CUDA generator (the CPU one and the CPU tracker
   are what dropout draws from), so an empty state stands in and restoring it does nothing.

`enable()` redirects exactly these to the CPU, and is called by `init_runtime`
only when the run's device is the CPU (also on a machine that has CUDA: the CPU
suite can run beside GPU tests); `disable()`, called by `destroy_runtime`, undoes
every patch, so nothing outlives the runtime. Nothing here changes numerics: with it,
`GPTModel` (local spec, `use_cpu_initialization=True`, float32) trains at TP, PP
and DP > 1 over gloo. It is meant for small models; real runs use GPUs.
"""

import contextlib
import warnings

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_active = None  # the _Patches of the enabled runtime, or None


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):  # a bare int means a CUDA ordinal to torch
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites a CUDA `device=` argument of any torch function to the CPU, makes
    `tensor.cuda()` a no-op (Megatron builds a tied model's last-stage embedding copy with
    `weight.data.cuda()`), and makes the legacy `tensor.type()` name of a CPU tensor read
    as its CUDA twin (the CPU stands in for the GPU, so type checks written for CUDA pass)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not args[0].is_cuda else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        return func(*args, **kwargs)


class _HostEvent:
    """An event on the CPU's stream: recorded after work that has already run."""

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True


class _HostStream:
    """The CPU's one stream: work is in program order, so every wait is already met.
    Constructed like `torch.cuda.Stream(device=..., priority=...)`; arguments are ignored."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None) -> _HostEvent:
        return event if event is not None else _HostEvent()

    def query(self) -> bool:
        return True


def _host_split_sizes(move_to_cpu):
    """Megatron's `maybe_move_tensor_to_cpu`, also converting host tensors when numpy is asked for."""

    def move(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return move_to_cpu(tensor, as_numpy=as_numpy, record_stream=record_stream)

    return move


def _host_stream_context(stream=None):
    """`torch.cuda.stream(s)`: on the CPU every stream is the one stream, so there is nothing to switch."""
    return contextlib.nullcontext(stream)


class CpuRNGStatesTracker:
    """Drop-in for Megatron's `CudaRNGStatesTracker` that forks the CPU generator.

    Megatron keeps named RNG streams (data-parallel, model-parallel, expert) so that
    dropout inside TP regions differs across TP ranks; on CPU the same streams are
    kept as CPU generator states.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._current_state_name = "default-rng"

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self.states_ = dict(states)

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)


def install_rng_tracker() -> CpuRNGStatesTracker:
    """Make Megatron's `get_cuda_rng_tracker()` return a fresh CPU tracker."""
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return tracker


def silence_accelerator_warnings() -> None:
    """Megatron warns once per module that TE/apex are missing; on CPU that is expected."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*Transformer Engine is not installed.*")


def import_megatron_eagerly() -> None:
    """Import Megatron-core with its JIT fuser off (a no-op if it is already imported).

    `megatron.core.jit.jit_fuser` is `torch.compile`, applied as a decorator at
    import time; on CPU that only costs start-up (~6 s importing dynamo) and the
    fused paths are disabled anyway. Megatron's own `disable_jit_fuser()` cannot be
    called before the package import that applies the decorators, so `torch.compile`
    is an identity decorator for the duration of the import.
    """
    import sys

    if "megatron.core" in sys.modules:
        return
    original = torch.compile

    def _identity(model=None, **kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = _identity
    try:
        import megatron.core  # noqa: F401
        from megatron.core import jit

        jit.disable_jit_fuser()
    finally:
        torch.compile = original


class _Patches:
    """What `enable()` replaced, kept so that `disable()` can put it back."""

    def __init__(self):
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.transformer.moe import token_dispatcher

        self.move_to_cpu = token_dispatcher.maybe_move_tensor_to_cpu
        self.current_device = torch.cuda.current_device
        self.synchronize = torch.cuda.synchronize
        self.current_stream = torch.cuda.current_stream
        self.stream_class = torch.cuda.Stream
        self.stream_context = torch.cuda.stream
        self.tracker = (mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED)
        self.cuda_rng_state = (mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state)
        self.mode = _CudaToCpuMode()

    def restore(self) -> None:
        from megatron.core.tensor_parallel import random as mrandom
        from megatron.core.transformer.moe import token_dispatcher

        stack = torch.overrides._get_current_function_mode_stack()
        if not stack or stack[-1] is not self.mode:
            # Popping would remove someone else's mode (e.g. an open `with torch.device(...)`).
            raise RuntimeError("cpu_support.disable(): another TorchFunctionMode was entered after "
                               "enable() and is still active; exit it first")
        self.mode.__exit__(None, None, None)
        torch.cuda.current_device = self.current_device
        torch.cuda.synchronize = self.synchronize
        torch.cuda.current_stream = self.current_stream
        torch.cuda.Stream = self.stream_class
        torch.cuda.stream = self.stream_context
        token_dispatcher.maybe_move_tensor_to_cpu = self.move_to_cpu
        mrandom._CUDA_RNG_STATE_TRACKER, mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = self.tracker
        mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = self.cuda_rng_state


def enable() -> None:
    """Redirect Megatron-core's CUDA assumptions to the CPU until `disable()` (idempotent).

    Works on a machine with CUDA too: a `device=cpu` run there keeps every tensor on the CPU.
    """
    global _active
    if _active is not None:
        return
    import_megatron_eagerly()
    patches = _Patches()
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    host_stream = _HostStream()
    torch.cuda.current_stream = lambda device=None: host_stream
    torch.cuda.Stream = _HostStream
    torch.cuda.stream = _host_stream_context
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = _host_split_sizes(patches.move_to_cpu)
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    # Entered for the life of the runtime, not around calls: the schedules and optimizer
    # create these tensors from many call sites, including user forward-step functions.
    patches.mode.__enter__()
    install_rng_tracker()
    _active = patches


def disable() -> None:
    """Undo `enable()`: CUDA calls, device kwargs and Megatron's RNG tracker are torch's and
    Megatron's own again (idempotent; a no-op when not enabled)."""
    global _active
    if _active is None:
        return
    _active.restore()
    _active = None


def is_enabled() -> bool:
    return _active is not None
