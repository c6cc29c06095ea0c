"""Megatron-LM's training code on CPU over gloo. Exists ONLY to check docs/distill.md's drop-in on a
machine without GPUs (examples/megatron_lm/distill.sh); on GPUs none of this is needed.

Python imports `sitecustomize` at start-up from the path, so putting this directory on
PYTHONPATH patches every process of the run before Megatron-LM's script runs, including those
that multiprocessing spawns (dist_checkpointing's writer starts a Manager, whose child re-imports
the script). No Megatron-LM file is changed. Only torchrun's workers are patched (they have
RANK set; the launcher itself does not).

Megatron-LM (tags core_v0.16.1 and core_v0.19.0) assumes CUDA in a few places that megatron-core's
own CPU support (`minitron_megatron.runtime.cpu_support`) does not cover; each patch names the
place, and patches only what the tag has (core_v0.19.0 has no megatron/legacy, hence no fused
kernels to build).
"""

import contextlib
import functools
import importlib.util
import os
import sys
import types


class _NoStream:
    """Stands in for torch.cuda.Stream: on CPU everything runs in order on one 'stream'."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


def _patch_torch_cuda() -> None:
    import torch

    from minitron_megatron.runtime import cpu_support

    cpu_support.silence_accelerator_warnings()
    # torch.cuda.current_device/synchronize, device="cuda" factories, .cuda(), the RNG tracker.
    cpu_support.enable()
    # initialize.py: `_initialize_distributed` builds the model-parallel groups and
    # `_set_random_seed` seeds the tracker only `if torch.cuda.device_count() > 0`, after
    # torch.cuda.set_device(local_rank).
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    # training.py `get_model`: builds DDP inside a side stream.
    torch.cuda.Stream = _NoStream
    torch.cuda.current_stream = lambda device=None: _NoStream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    # rerun_state_machine.py `_save_state`/`_restore_state` (every step) keep the CUDA generator's
    # state beside the CPU one; there is no CUDA generator: an empty state, restored as nothing.
    torch.cuda.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda state, device="cuda": None


def _patch_megatron_lm() -> None:
    import megatron.core.datasets.utils as dataset_utils
    import megatron.training.arguments as arguments
    import megatron.training.training as training

    # initialize.py `_compile_dependencies`: runs `make` in megatron/core/datasets (the pip wheel
    # ships the compiled helpers_cpp and no Makefile) and, at core_v0.16.1 only, builds CUDA
    # kernels with nvcc (megatron/legacy/fused_kernels, gone with megatron/legacy at core_v0.19.0).
    dataset_utils.compile_helpers = lambda: None
    if importlib.util.find_spec("megatron.legacy") is not None:
        importlib.import_module("megatron.legacy.fused_kernels").load = lambda args: None
    # arguments.py `validate_args` at TP>1 reads the GPU's compute capability; answer as a
    # pre-Blackwell GPU (that branch asks for CUDA_DEVICE_MAX_CONNECTIONS=1, as on most GPUs).
    arguments.get_device_arch_version = lambda: 0
    # initialize.py: `assert torch.cuda.is_available()` unless allow_no_cuda (not a pretrain() argument).
    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)


if "RANK" in os.environ:
    # megatron/training/tokenizer/bert_tokenization.py imports six for py2 shims only.
    sys.modules.setdefault("six", types.ModuleType("six"))
    _patch_torch_cuda()
    _patch_megatron_lm()
