"""Preemption: SIGTERM / SIGUSR1 turn into "save at the end of this step and exit".

SLURM sends SIGTERM before it kills a job (time limit, `scancel`, preemption) and,
with `#SBATCH --signal=USR1@<seconds>`, SIGUSR1 that many seconds ahead. torchrun
forwards SIGTERM to its workers. A training loop inside `PreemptionWatch` asks
`should_stop()` after every step; all ranks agree through one all-reduce, so they
save the same step together and exit with `PREEMPTED_EXIT`. The run dir then has
a checkpoint and no summary.json: rerunning the same command resumes it.
"""

import signal
from typing import Optional

import torch
import torch.distributed as dist

from minitron_megatron.runtime.context import ParallelContext

PREEMPTED_EXIT = 75
"""Exit status of a preempted run (EX_TEMPFAIL: "try again"); resumable by rerunning."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the training driver after the preemption checkpoint is committed."""

    def __init__(self, step: int, signal_name: str, save):
        self.step, self.signal_name, self.save = step, signal_name, str(save)
        super().__init__(f"{signal_name} received: saved step {step} to {save}; rerun the same command to resume")


class PreemptionWatch:
    """Signal handlers for the life of a training loop (restored on exit)."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.received: Optional[str] = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name  # only a flag: the step finishes first

    def __enter__(self) -> "PreemptionWatch":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (one tiny all-reduce per call)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.ctx.device)
        if dist.is_initialized() and self.ctx.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = "SIGTERM (another rank)"
        return bool(flag.item())
