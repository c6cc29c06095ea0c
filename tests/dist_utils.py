"""Run a test body in N real processes over gloo (no mocked collectives)."""

import os
import traceback

import torch.multiprocessing as mp

from minitron_megatron.runtime.distributed import free_port


def _worker(rank, world_size, port, fn, args, errors):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
    )
    try:
        fn(rank, world_size, *args)
    except BaseException:  # report every rank's failure to the parent
        errors.put((rank, traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    """Call `fn(rank, world_size, *args)` in `world_size` spawned processes.

    `fn` must be a module-level function (it is pickled). The environment carries
    torchrun's variables, so `init_runtime()` works inside `fn` as under torchrun.
    Results come back through files in a tmp_path that the test passes in `args`.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    if failures or hung or any(p.exitcode != 0 for p in procs):
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures))
        raise AssertionError(f"distributed test failed (hung ranks: {hung}):\n{msg}")
