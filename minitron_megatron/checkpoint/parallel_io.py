"""How a dist checkpoint is written and read: Megatron's torch_dist strategies, spread over the
data-parallel group, and asynchronous saves.

Plain `dist_checkpointing.save` lets the main replica of each shard write it: DP rank 0 writes the
whole model and optimizer of its TP/PP slice while the other DP ranks wait, and a plain load has
every DP rank read the full slice. Megatron-LM's `--ckpt-fully-parallel-save` (its default) and
`--ckpt-fully-parallel-load` wrap the strategies so that the DP ranks split the shards evenly
(`FullyParallelSaveStrategyWrapper`: metadata only, no tensor moves) and, on load, each reads
1/DP and the ranks exchange the rest over the DP group (`FullyParallelLoadStrategyWrapper`).
The files are the same torch_dist format either way: a checkpoint saved one way loads the other.

Asynchronous save (Megatron-LM's `--async-save`): the shards are written by a forked process
(a copy-on-write snapshot of the state at the fork) while training goes on; Megatron's
`AsyncCallsQueue` runs the request's finalize functions, on every rank, only once every rank's
writer has finished. Our commit (fsync, rename, tracker, pruning) is the last of them, so a run
dir never names a checkpoint whose shards are still being written.
"""

import multiprocessing
import signal
from functools import partial
from multiprocessing.managers import SyncManager
from typing import Optional

from minitron_megatron.megatron_compat import async_save_kwargs
from minitron_megatron.runtime.context import ParallelContext


def fully_parallel(setting: Optional[bool], ctx: Optional[ParallelContext]) -> bool:
    """Whether to spread a save or load over the DP group: `setting`, or (None) when DP > 1.
    Never at DP=1 (nothing to spread over; Megatron's save wrapper expects a real group), nor
    without a context (a model-only load outside a run)."""
    if ctx is None or ctx.dp_group is None or ctx.dp_size < 2:
        return False
    return True if setting is None else bool(setting)


def save_strategy(ctx: ParallelContext, spread: bool):
    """Megatron's torch_dist save strategy, wrapped to split the writes over the DP group."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    strategy = get_default_save_sharded_strategy(backend="torch_dist")
    if not spread:
        return strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(strategy=strategy, parallelization_group=ctx.dp_group)


def load_strategy(checkpoint_dir: str, ctx: ParallelContext, spread: bool):
    """The checkpoint's load strategy (torch_dist, from its metadata), wrapped to split the reads
    over the DP group; None (Megatron's default) when not spread."""
    if not spread:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = get_default_load_sharded_strategy(checkpoint_dir=str(checkpoint_dir))
    return FullyParallelLoadStrategyWrapper(strategy=strategy, parallelization_group=ctx.dp_group)


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def shield_writer_queue() -> None:
    """Start the checkpoint writer's result queue in a process that survives a preemption signal.

    Megatron's torch_dist writer reports each file's write results through one queue per process
    (`filesystem_async._results_queue`), served by a multiprocessing Manager that the first save
    spawns. SLURM's SIGTERM (and `scancel --signal`) reaches every process of the job step, that
    server included, and it died of it: the preemption save then failed with a BrokenPipeError and
    the run lost every step since its last periodic checkpoint. Here the same queue comes from a
    Manager whose process blocks those signals (SIGKILL still ends it with the job), created
    before Megatron would create its own. A module global of Megatron's, the same in 0.16 and 0.19.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))  # Megatron's own context
    manager.start(initializer=partial(signal.pthread_sigmask, signal.SIG_BLOCK, PREEMPTION_SIGNALS))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def start_save(state: dict, checkpoint_dir: str, strategy, asynchronous: bool):
    """`dist_checkpointing.save`: the shards written now (None), or an `AsyncRequest` to schedule."""
    from megatron.core import dist_checkpointing

    shield_writer_queue()

    extra = async_save_kwargs() if asynchronous else {}
    return dist_checkpointing.save(sharded_state_dict=state, checkpoint_dir=str(checkpoint_dir),
                                   sharded_strategy=strategy, async_sharded_save=asynchronous, **extra)


class AsyncSaves:
    """The asynchronous checkpoint writes of one training loop, at most one in flight.

    Every method is collective (every rank, in the same order): the queue all-reduces whether
    the writers are done, so all ranks commit the same save at the same call. One at a time:
    a commit renames its `iter_` dir and prunes older ones, which must happen in step order.
    Use as a context manager: a normal exit waits for the last write and commits it; an
    exception aborts the write in flight without committing it, so the previous checkpoint
    stays the latest (what a crash there would leave too).
    """

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)  # a fork per save: a snapshot of the state

    def schedule(self, request) -> None:
        """Start writing `request` (its finalize functions end with the commit)."""
        self.finish()
        self._queue.schedule_async_request(async_request=request)

    def poll(self) -> None:
        """Commit the save in flight if every rank's writer has finished; never waits for one."""
        self._queue.maybe_finalize_async_calls(blocking=False)

    def finish(self) -> None:
        """Wait for the save in flight, then commit it."""
        self._queue.maybe_finalize_async_calls(blocking=True)

    @property
    def pending(self) -> int:
        return self._queue.get_num_unfinalized_calls()

    def __enter__(self) -> "AsyncSaves":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    def abort(self) -> None:
        """Kill this rank's writer, commit nothing (not collective: for failure paths). The queue's
        own `close(abort=True)` leaves a forked writer running on both releases."""
        for call in self._queue.async_calls:
            call.async_caller.close(abort=True)
        self._queue.async_calls.clear()
