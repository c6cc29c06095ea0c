"""Megatron dist checkpoints (`torch_dist`) in Megatron-LM's directory layout.

`ROOT/latest_checkpointed_iteration.txt` names the committed `ROOT/iter_XXXXXXX/`.
The state dict has Megatron-LM's top-level keys (`model`, `optimizer`,
`opt_param_scheduler`, `iteration`, `checkpoint_version`), so Megatron-LM's
`--load ROOT --ckpt-format torch_dist` reads ours and we read theirs. Sharded
tensors carry global offsets, so a checkpoint saved at one TP/PP loads at another.
"""

import os
import random
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from minitron_megatron.checkpoint.parallel_io import AsyncSaves, load_strategy, save_strategy, start_save
from minitron_megatron.checkpoint.parallel_io import fully_parallel as use_fully_parallel
from minitron_megatron.checkpoint.run_dir import atomic_write_text, fsync_dir
from minitron_megatron.errors import ConfigError
from minitron_megatron.megatron_compat import (distributed_optimizer_before_load, distributed_optimizer_loading,
                                               load_common_state_dict, load_dist_checkpoint)
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.faults import fault_point

TRACKER = "latest_checkpointed_iteration.txt"

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
"""How Megatron's DistributedOptimizer lays out its state in a checkpoint (the plain optimizer
ignores it): `fully_reshardable`, Megatron-LM's `--dist-ckpt-optim-fully-reshardable`. At save
the DP ranks all-gather their shards (into host memory) and write each parameter's Adam state and
float32 main weight as a tensor of the parameter's own shape and global offsets, keyed like the
plain optimizer's (`optimizer.state.exp_avg.<param key>`), so a load reads it back at any DP, TP
or PP size and slices its own shard. Why not the others megatron-core 0.16.1 and 0.19.2 offer:
their default, `fully_sharded_model_space` (no communication), writes flattened slices, which
both releases' ShardedTensor refuses ("flattened_range is not supported"); `dp_reshardable`
(Megatron-LM's default) stores the internal buckets and reshards over DP only, not TP or PP."""


def iteration_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root) -> Optional[int]:
    """The committed iteration under `root` (Megatron-LM tracker file), or None without a tracker.

    A tracker naming a directory that does not exist is an error, never "no checkpoint":
    older iterations are deleted after each commit, so starting from scratch would
    silently throw the run away.
    """
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    iteration = 0 if text == "release" else _parse_iteration(tracker, text)
    committed = _committed_dir(root, iteration)
    if not committed.is_dir():
        raise ConfigError(f"{tracker} names {committed.name}, but {committed} does not exist: the checkpoint "
                          "was moved or deleted; restore it, or delete the tracker file to start over")
    return iteration


def _parse_iteration(tracker: Path, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{tracker} holds {text!r}, not an iteration number or 'release'") from None


def _committed_dir(root, iteration: int) -> Path:
    if (Path(root) / TRACKER).read_text().strip() == "release":
        return Path(root) / "release"
    return iteration_dir(root, iteration)


def _rng_state(ctx: ParallelContext):
    """Per-rank RNG streams in Megatron-LM's layout (`get_rng_state` in
    megatron/training/checkpointing.py): a ShardedObject indexed by (pp, tp) holding
    a one-element list. `cuda_rng_state` is present when CUDA is (a CPU run has none)."""
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return ShardedObject(key="rng_state", data=[state], global_shape=(ctx.pp_size, ctx.tp_size),
                         global_offset=(ctx.pp_rank, ctx.tp_rank), replica_id=ctx.dp_rank)


def save_checkpoint(root, iteration: int, model, ctx: ParallelContext, optimizer=None, scheduler=None,
                    extra: Optional[dict] = None, keep_last: int = 2, args=None,
                    release_model: bool = False, fully_parallel: Optional[bool] = None,
                    async_saves: Optional[AsyncSaves] = None) -> Path:
    """Collectively save; the tracker file is the commit point, written after every rank is done.

    Durable before it counts: the new dir's files and entries are fsynced before its rename, the
    rename is fsynced (`ROOT`'s entry) before the tracker names it, and the tracker's own rename is
    fsynced before any older iteration is deleted. `keep_last`: committed iterations kept (the
    new one included); older ones are deleted only once the new one is committed (`_prune_old`).

    `args`: Megatron-LM's argument namespace (`checkpoint.megatron_lm.checkpoint_args`), saved
    under "args" so Megatron-LM's `load_checkpoint` checks and resumes from our checkpoints.
    `release_model`: the caller is done with `model` (an import): see `_copy_views_releasing`.
    `fully_parallel`: split the writes over the DP group (None: when DP > 1; checkpoint/parallel_io.py).
    `async_saves`: write in a background process and commit when every rank's writer is done, at a
    later `async_saves.poll()` / `finish()`; the save before it is committed first. Returns the
    directory the checkpoint is (or will be) committed to.
    """
    root = Path(root)
    if async_saves is not None:
        async_saves.finish()  # commits happen in step order, one at a time
    final, tmp = iteration_dir(root, iteration), root / f".iter_{iteration:07d}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    state = {"model": model.sharded_state_dict(), "iteration": iteration, "checkpoint_version": 3.0}
    if release_model:
        _copy_views_releasing(state["model"], model)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], metadata=OPTIMIZER_METADATA)
        state["opt_param_scheduler"] = scheduler.state_dict()
        state["rng_state"] = _rng_state(ctx)
    if extra:
        state["minitron"] = extra
    if args is not None:
        state["args"] = args
    strategy = save_strategy(ctx, spread=use_fully_parallel(fully_parallel, ctx))
    request = start_save(state, tmp, strategy, asynchronous=async_saves is not None)
    commit = partial(_commit, root, tmp, final, iteration, keep_last, ctx)
    if request is None:
        commit()
    else:  # Megatron's queue runs it on every rank once every rank's writer has finished
        request.finalize_fns.append(commit)
        async_saves.schedule(request)
    return final


def _commit(root: Path, tmp: Path, final: Path, iteration: int, keep_last: int, ctx: ParallelContext) -> None:
    """Make the written `tmp` the committed `final` (collective; see `save_checkpoint` for the order)."""
    fault_point("checkpoint.write")  # every shard written, nothing renamed yet
    ctx.barrier()
    if ctx.is_main:
        _fsync_contents(tmp)  # Megatron's writers fsync their shards; common.pt is torch.save's
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        fsync_dir(root)
        fault_point("checkpoint.commit")
        atomic_write_text(root / TRACKER, f"{iteration}\n")
        _prune_old(root, keep=keep_last)
    ctx.barrier()


def _copy_views_releasing(sharded: dict, model) -> None:
    """Copy, one parameter at a time, the shards dist_checkpointing would copy all at once, and
    free each parameter as soon as its copies exist.

    Megatron's writer (FileSystemWriterAsync._clone_if_needed) clones every CPU tensor that is a
    view of a larger storage before writing any file; the GLU fc1 factory splits each [gate; up]
    weight into two such views, so a save held the model plus a second copy of every fc1 (0.2x
    of a Llama checkpoint per rank at TP=2). Applying the factories here and cloning the views
    storage by storage, releasing each parameter after, bounds the extra to one fc1 weight.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict=sharded)
    views = {}  # storage pointer -> the ShardedTensors that view part of it
    for sh in nested_values(x=sharded):
        if isinstance(sh, ShardedTensor) and sh.data is not None and sh.data.device.type == "cpu":
            storage = sh.data.untyped_storage()
            if storage.nbytes() != sh.data.numel() * sh.data.element_size():
                views.setdefault(storage.data_ptr(), []).append(sh)
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    for ptr, shards in views.items():
        for sh in shards:
            sh.data = sh.data.detach().clone()
        if ptr in params:  # nothing else needs the full weight: the model is not used again
            params[ptr].data = torch.empty(0, dtype=params[ptr].dtype)


def _fsync_contents(directory: Path) -> None:
    """fsync every file directly in `directory` (a dist checkpoint is flat), then its entries."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(directory)


def _prune_old(root: Path, keep: int) -> None:
    """Delete the committed iterations older than the newest `keep` (the tracker's included).

    Only iterations at or below the tracker's count: a newer `iter_` dir is what a crash left
    between its rename and the tracker write (never committed, overwritten when the run gets
    there); counting it would delete a committed one in its place, possibly the only one."""
    committed = latest_iteration(root)
    if committed is None:
        return
    iters = sorted(p for p in root.glob("iter_*") if p.is_dir() and _number(p) is not None
                   and _number(p) <= committed)
    for old in iters[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(root)


def _number(path: Path) -> Optional[int]:
    try:
        return int(path.name[len("iter_"):])
    except ValueError:
        return None


def _committed_path(root) -> str:
    iteration = latest_iteration(root)
    if iteration is None:
        raise FileNotFoundError(f"no committed checkpoint under {root} ({TRACKER} missing)")
    return str(_committed_dir(root, iteration))


def load_checkpoint(root, model, ctx: Optional[ParallelContext], optimizer=None, scheduler=None,
                    fully_parallel: Optional[bool] = None) -> dict:
    """Load model (and optimizer, scheduler, RNG when given) at this rank's TP/PP.

    `ctx` is needed only with an optimizer (for the per-rank RNG state) and to split the reads
    over the DP group (`fully_parallel`; None: when DP > 1; checkpoint/parallel_io.py).

    Returns the checkpoint's non-tensor state: `iteration` and our `minitron` extras.
    """
    iteration = latest_iteration(root)
    path = _committed_path(root)
    model_sd = model.sharded_state_dict()
    request = {"model": model_sd}
    if optimizer is not None:
        distributed_optimizer_before_load(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
        request["rng_state"] = _rng_state(ctx)
    strategy = load_strategy(path, ctx, spread=use_fully_parallel(fully_parallel, ctx))
    loaded = load_dist_checkpoint(sharded_state_dict=request, checkpoint_dir=path,
                                  **({"sharded_strategy": strategy} if strategy is not None else {}))
    model.load_state_dict(loaded["model"], strict=True)
    if optimizer is not None:
        with distributed_optimizer_loading(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
        _restore_rng(loaded["rng_state"])
    return {"iteration": loaded.get("iteration", iteration), "minitron": loaded.get("minitron", {})}


def stream_parameters(root, model, names: List[str], device) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, this rank's shard) of each parameter in `names`, in order, read from the checkpoint
    into fresh storage on `device` that only the caller then holds.

    Why not `load_checkpoint`: it fills every parameter at once, and Megatron's load then joins
    each GLU fc1 factory's `[gate; up]` halves into a new tensor (`apply_factory_merges`), so a
    caller that only streams the weights out (the export) would hold the whole shard and a second
    copy of every fc1. Here the model's parameters are never touched (a meta model will do).
    Consecutive parameters share one `dist_checkpointing.load` up to the bytes of the largest one
    (a transformer layer or two, next to a vocab-parallel embedding), so a load holds no more than
    the largest parameter would alone (plus Megatron's read buffer),
    in a few loads rather than one per tensor: each load synchronises every rank several times,
    and 99 of them took 10-13 s of a 1.65 GiB export on 2 shared cores, 18 took 4-5 s.

    Collective over the world, like every `dist_checkpointing.load`: each rank makes as many calls
    as the rank with the most groups, and ranks with fewer (another pipeline stage, a replica that
    reads nothing) make empty ones, so the caller must run the iterator to its end.
    """
    path = _committed_path(root)
    entries = model.sharded_state_dict()  # ShardedTensor / fc1 ShardedTensorFactory per parameter
    groups = _groups_up_to_largest(names, {name: _nbytes(entries[name].data) for name in names})
    for step in range(_most_over_ranks(len(groups))):
        group = groups[step] if step < len(groups) else []
        loaded = _load_entries(path, {name: entries.pop(name) for name in group}, device)
        for name in group:
            yield name, loaded.pop(name)  # the caller's reference is the only one left


def _groups_up_to_largest(names: List[str], nbytes: dict) -> List[List[str]]:
    """`names` cut into runs whose bytes add up to at most the largest single one."""
    budget = max(nbytes.values(), default=0)
    groups, size = [], 0
    for name in names:
        if not groups or size + nbytes[name] > budget:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes[name]
    return groups


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _load_entries(path: str, entries: dict, device) -> dict:
    """{name: tensor} of these sharded-state-dict entries (none: an empty load that keeps this
    rank in step), read into fresh storage on `device`; the model's own parameters (meta, or
    storage nobody reads) stay untouched. A function, so no reference to the request, which
    holds the read buffers, outlives the call."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import apply_factories

    fresh = {name: torch.empty(entry.data.shape, dtype=entry.data.dtype, device=device)
             for name, entry in entries.items()}
    request = {name: replace(entry, data=fresh[name]) for name, entry in entries.items()}
    # GLU fc1's factory becomes its [gate; up] halves, views of the fresh tensor: torch_dist reads
    # into the request's tensors in place, so fc1 needs no merge (which would copy it).
    apply_factories(sharded_state_dict=request)
    dict_list_map_inplace(f=_layer_axes_in_local_shape, x=request)
    # Megatron's access check wants each call to cover every global tensor it touches; one
    # layer of a layer-stacked key (`decoder.layers.*`, shape [num_layers, ...]) cannot.
    load_dist_checkpoint(sharded_state_dict=request, checkpoint_dir=path, validate_access_integrity=False)
    return fresh


def _layer_axes_in_local_shape(entry):
    """A ShardedTensor with prepended axes (one layer of a layer-stacked key) as the same slice
    with those axes, of size 1, in its local shape, over a view of the same data.

    Why: Megatron reads a tensor with prepended axes through a torch ShardedTensor on a regular
    grid that it completes itself, placing every grid cell this rank does not ask for on rank
    (rank + 1) % world_size. In a one-process world (`convert` without torchrun) that is this
    rank, so a load asking for some of a key's layers, but not all, failed ("Number of local
    shards (3) does not match ... (4)"). Without prepended axes Megatron (with torch >= 2.6,
    which every megatron-core we support requires) hands DCP just the shards asked for, and DCP
    reads whatever part of the stored chunks they cover: any layers, any TP slice."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if not isinstance(entry, ShardedTensor) or not entry.prepend_axis_num:
        return entry
    shape = (1,) * entry.prepend_axis_num + tuple(entry.local_shape)
    return replace(entry, data=entry.data.view(shape), local_shape=shape, prepend_axis_num=0)


def _most_over_ranks(count: int) -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        return count
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, count)
    return max(counts)


def _restore_rng(states) -> None:
    """Set every saved stream back; also reads the `{torch, tracker}` layout of older run dirs."""
    from megatron.core import tensor_parallel

    state = states[0] if isinstance(states, list) else states
    if "torch" in state:  # run dirs written before the Megatron-LM layout
        state = {"torch_rng_state": state["torch"], "rng_tracker_states": state["tracker"]}
    if "random_rng_state" in state:
        random.setstate(state["random_rng_state"])
        np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states=state["rng_tracker_states"])


def load_common(root) -> dict:
    """The checkpoint's replicated (non-tensor) state, read without building a model."""
    iteration = latest_iteration(root)
    return load_common_state_dict(checkpoint_dir=str(_committed_dir(root, iteration)))


def optimizer_format(root) -> Optional[bool]:
    """Whether the committed checkpoint under `root` holds Megatron DistributedOptimizer state
    (its `param_state_sharding_type` marker; False: a plain optimizer's, None: no optimizer)."""
    common = load_common(root).get("optimizer")
    if common is None:
        return None
    return _has_key(common, "param_state_sharding_type")


def _has_key(tree, key: str) -> bool:
    """`key` anywhere in nested dicts/lists (a ChainedOptimizer nests one state per optimizer)."""
    if isinstance(tree, dict):
        return key in tree or any(_has_key(v, key) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_has_key(v, key) for v in tree)
    return False
