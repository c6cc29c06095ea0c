"""Every difference between the megatron-core releases we support, in one module.

Tested at both ends of the range: 0.16.1 (the newest release for Python 3.10/3.11) and 0.19.2
(Python 3.12; 0.17 and later require it). The rest of the package never asks which release it
runs on, and calls Megatron with keyword arguments only, so parameters that releases insert or
remove mid-signature cannot shift ours (tests/test_layers.py checks both rules).

What changed, and where it is handled:
- 0.17.0 moved a dist checkpoint's common (unsharded) state from `common.pt` into the
  torch_dist shards, as a ShardedObject `common_state`. 0.17+ reads both layouts; 0.16 reads
  only `common.pt`, so on 0.16 `load_dist_checkpoint` / `load_common_state_dict` read the
  shards' copy when there is no `common.pt` (a run dir written by 0.17+, or a Megatron-LM
  checkpoint of that age).
- 0.17.0 removed `megatron.core.datasets.megatron_tokenizer` (the dataset tokenizer ABC).
  No version check is needed: `data/tokenizer.py` implements the few attributes GPTDataset
  reads instead of inheriting from either release's base class.
- 0.17.0's DDP waits on `torch.cuda.current_stream()` before each grad reduce: handled, with
  the other CUDA assumptions, by `runtime/cpu_support.py` (a stream that waits on nothing).
- 0.16.1's `transformer.moe.moe_utils` imports `te_general_gemm` only when Transformer Engine
  imports, and leaves the name undefined otherwise, so the MoE router's gating raises NameError
  without TE (CPU runs, GPU runs on the local spec); 0.19.2 binds it to None there.
  `define_router_gemm_fallback` binds it to None on 0.16, which selects the router's torch matmul.
- Asynchronous checkpoint saves: 0.16.1's `dist_checkpointing.save(async_sharded_save=True)` uses
  Megatron's own writer (a forked process per save). 0.19.2 added `async_strategy`, defaulting to
  "nvrx" (nvidia-resiliency-ext, which we neither require nor install); "mcore" is the 0.16 writer,
  still there (logged as deprecated). `async_save_kwargs` asks for it where the parameter exists.
  The fully-parallel strategy wrappers take the same keywords on both releases (0.19 no longer
  derives them from a base class, and forwards `async_strategy` to its base strategy).

Not a difference but a defect of both (0.16.1 and 0.19.2), kept here because a later release may
fix it: without Apex or Transformer Engine, the DistributedOptimizer runs torch's Adam, whose
per-parameter state holds a "step" tensor that the checkpoint load paths do not expect.
`distributed_optimizer_before_load` and `distributed_optimizer_loading` make a resume work there.
"""

import io
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from packaging.version import Version

MEGATRON_CORE = Version(metadata.version("megatron-core"))
TESTED_RANGE = ("0.16.1", "0.19.2")

MEGATRON_LM_TAG = "core_v0.16.1" if MEGATRON_CORE < Version("0.17.0") else "core_v0.19.0"
"""The Megatron-LM tag whose training code (`megatron/training`, `pretrain_gpt.py`; on no package
index) goes with this megatron-core: what examples/megatron_lm and the interop tests run. Its
`check_checkpoint_args` fields, rng-state layout and sample-counted scheduler are the same at
both tags (tests/test_megatron_lm_interop.py reads them from each tag's source)."""

COMMON_STATE_IN_SHARDS = MEGATRON_CORE >= Version("0.17.0")
"""Whether this release writes (and reads) the common state inside the torch_dist shards."""

LEGACY_COMMON_FILE = "common.pt"


def load_dist_checkpoint(sharded_state_dict: dict, checkpoint_dir: str, **kwargs):
    """`dist_checkpointing.load` that also reads, on 0.16, a checkpoint written by 0.17+."""
    from megatron.core import dist_checkpointing

    if not COMMON_STATE_IN_SHARDS:
        kwargs["common_strategy"] = _common_state_reader_016()
    return dist_checkpointing.load(sharded_state_dict=sharded_state_dict, checkpoint_dir=str(checkpoint_dir),
                                   **kwargs)


def load_common_state_dict(checkpoint_dir: str) -> dict:
    """A dist checkpoint's common state (no model needed), whichever release wrote it."""
    from megatron.core import dist_checkpointing

    if not COMMON_STATE_IN_SHARDS and not (Path(checkpoint_dir) / LEGACY_COMMON_FILE).is_file():
        return _common_state_from_shards(checkpoint_dir)
    return dist_checkpointing.load_common_state_dict(checkpoint_dir=str(checkpoint_dir))


def _common_state_from_shards(checkpoint_dir) -> dict:
    """The `common_state` object 0.17+ saves among the shards, read as 0.17's
    `load_common_state_dict` reads it (one object, replicated: no process group needed)."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as torch_dcp_load

    key = ShardedObject(key="common_state", data=None, global_shape=(1,), global_offset=(0,)).unique_key
    state = {key: io.BytesIO()}
    torch_dcp_load(state, storage_reader=FileSystemReader(str(checkpoint_dir)), no_dist=True)
    loaded = state[key]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0]


def _common_state_reader_016():
    """0.16's common-load strategy, reading the shards' copy when `common.pt` is absent.
    Built on call: its base class lives in modules that 0.17 deleted."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class CommonStateReader(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            if (Path(checkpoint_dir) / LEGACY_COMMON_FILE).is_file():
                return super().load_common(checkpoint_dir)
            return _common_state_from_shards(checkpoint_dir)

    return CommonStateReader()


def _torch_adam_distributed_optimizers(optimizer):
    """The DistributedOptimizers in `optimizer` (chained or not) that run torch's Adam."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [inner for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(inner, DistributedOptimizer) and isinstance(getattr(inner, "optimizer", None),
                                                                      torch.optim.Adam)]


def distributed_optimizer_before_load(optimizer) -> None:
    """Give a torch-Adam DistributedOptimizer that has not stepped yet the state a step makes.

    Its `state_dict()` (called by `sharded_state_dict(is_loading=True)`, what a resume asks for
    before any step) reads the step count from torch Adam's per-parameter state, which torch
    creates only in the first step: `assert len(steps) == 1` fails. Zeros of the right shapes (as
    Megatron's `init_state_fn` makes for the plain optimizer) and step 0, all overwritten by the load."""
    import torch

    for inner in _torch_adam_distributed_optimizers(optimizer):
        if inner.optimizer.state:
            continue
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                inner.optimizer.state[param].update(exp_avg=torch.zeros_like(param),
                                                    exp_avg_sq=torch.zeros_like(param), step=torch.tensor(0.0))


@contextmanager
def distributed_optimizer_loading(optimizer):
    """Around `optimizer.load_state_dict` of a torch-Adam DistributedOptimizer, two repairs:

    - its parameter-state load (`_set_main_param_and_optimizer_states`) copies into every tensor
      of a parameter's state, "step" included, from the checkpoint's tensors, which never hold
      "step" (it comes from the param groups): KeyError 'step'. Within, each parameter's step is
      set aside while its other state is copied, then put back;
    - it gives every parameter the SAME step tensor (`s["step"] = step` in a loop; torch's
      `load_state_dict` keeps it), and torch's Adam increments each parameter's step in place, so
      after one step the count is steps + number of parameters, and the bias correction is wrong
      for the rest of the run. After the load, each parameter gets its own copy."""
    patched = _torch_adam_distributed_optimizers(optimizer)
    for inner in patched:
        inner._set_main_param_and_optimizer_states = _step_kept(inner, inner._set_main_param_and_optimizer_states)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states  # the class's method again
    for inner in patched:
        for state in inner.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def _step_kept(inner, set_states):
    def set_states_keeping_step(model_param, tensors):
        group_index, group_order = inner.model_param_group_index_map[model_param]
        state = inner.optimizer.state[inner.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            set_states(model_param=model_param, tensors=tensors)
        finally:
            if step is not None:
                state["step"] = step

    return set_states_keeping_step


def async_save_kwargs() -> dict:
    """Keywords for `dist_checkpointing.save(async_sharded_save=True)` that select Megatron's
    built-in asynchronous writer (see the module docstring). Read from the signature: the
    parameter is in 0.19.2, not in 0.16.1, and no release between is pinned here."""
    import inspect

    from megatron.core import dist_checkpointing

    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_strategy": "mcore"}
    return {}


def define_router_gemm_fallback() -> None:
    """Make the MoE router's gating run without Transformer Engine on 0.16.1 (see the module
    docstring): there `moe_utils.te_general_gemm` is unbound when TE is missing, and the gating
    reads it as a global (None means: use torch's matmul). A no-op on 0.19.2 and wherever TE
    imports, so it is safe to call before every MoE build."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
