"""`python -m minitron_megatron.search` with spies, for tests that need to see inside one search.

    python -m tests.search.spy_search OUT.json DIVERGE -- search overrides...

Writes OUT.json at exit: `loads`, the checkpoint root of every `checkpoint.dist.load_checkpoint`
call (every model read: teacher, trim source, student start), in order; `left`, after each
candidate, how many Megatron DDP wrappers and grad buffers are still alive (an earlier
candidate's, not freed); `rss`, the process's RSS then (MiB). DIVERGE (a candidate index,
"all", or -1 for none): that candidate's distillation reports a NaN KD loss from its first
step, as a diverging run would.
"""

import atexit
import json
import sys
from pathlib import Path


def main() -> None:
    out, diverge = sys.argv[1], sys.argv[2]
    sys.argv = [sys.argv[0], *sys.argv[sys.argv.index("--") + 1:]]
    loads, left, rss = [], [], []
    atexit.register(lambda: Path(out).write_text(json.dumps({"loads": loads, "left": left, "rss": rss})))

    import minitron_megatron.runtime as runtime
    from minitron_megatron.cli import main as cli_main

    init_runtime = runtime.init_runtime

    def spied_runtime(*args, **kwargs):  # Megatron is imported only once the runtime is up
        ctx = init_runtime(*args, **kwargs)
        _spy(loads, left, rss, diverge)
        return ctx

    runtime.init_runtime = spied_runtime  # the CLI looks it up when it starts the command
    cli_main("search")


def _alive(*names: str) -> int:
    import gc

    return sum(type(obj).__name__ in names for obj in gc.get_objects())


def _spy(loads: list, left: list, rss: list, diverge: str) -> None:
    import psutil

    from minitron_megatron.checkpoint import dist
    from minitron_megatron.distill import loop
    from minitron_megatron.search import command

    load_checkpoint, run_training, run_candidate = dist.load_checkpoint, loop.run_training, command.run_candidate

    def spied_load(root, *args, **kwargs):
        loads.append(str(Path(root).resolve()))
        return load_checkpoint(root, *args, **kwargs)

    def spied_training(job, ctx):
        if f"candidates/{diverge}/" in str(job.save) + "/" or (diverge == "all" and "candidates/" in str(job.save)):
            step = job.step
            job.step = lambda batches: {**step(batches), "kd_loss": float("nan")}
        return run_training(job, ctx)

    def spied_candidate(*args, **kwargs):
        run_candidate(*args, **kwargs)
        left.append(_alive("DistributedDataParallel", "_ParamAndGradBuffer"))
        rss.append(psutil.Process().memory_info().rss >> 20)

    dist.load_checkpoint, loop.run_training, command.run_candidate = spied_load, spied_training, spied_candidate


if __name__ == "__main__":
    main()
