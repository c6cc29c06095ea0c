"""The one training driver: resume -> steps (guard, log, eval, save, early exit, preemption) -> summary.

`train` and `distill` (and the search's per-candidate distillation) describe their
run as a `TrainingJob`: how to take one optimizer step, how to evaluate, where the
batches come from, how to start when there is nothing to resume, and their summary
fields. Everything else is here, once:

- resume: an unfinished `save` dir (a committed checkpoint, no summary.json) restarts
  at its last step with model, optimizer, LR schedule, RNG and data position;
- periodic validation on `eval_samples`, and a final one (`final_eval`) that is the
  same measurement `evaluate load=SAVE` makes (same samples, same micro-batches);
- checkpoints every `save_interval` steps, at the last step, at `exit_after_steps`
  and on preemption (SIGTERM/SIGUSR1: runtime/preemption.py), the newest `keep_last` kept;
  written over the DP ranks, and (`async_save`) the periodic ones in the background, each
  committed at the first step after every rank's writer finished (checkpoint/parallel_io.py);
- the logger's lifetime; summary.json written last, so a crash never looks complete.
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.parallel_io import AsyncSaves
from minitron_megatron.config.train import TrainConfig
from minitron_megatron.runtime import clock
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.preemption import Preempted, PreemptionWatch
from minitron_megatron.train import moe_metrics
from minitron_megatron.train.logger import TrainLogger
from minitron_megatron.train.optimizer import optimizer_problems, params_in_sync


class TrainingDiverged(RuntimeError):
    """A guarded metric became NaN/Inf; the last committed checkpoint is the last good one."""

    def __init__(self, step: int, component: str, value: float, last_checkpoint, setting: str):
        self.step, self.component, self.value, self.last_checkpoint = step, component, value, last_checkpoint
        super().__init__(
            f"training diverged at step {step}: {component} = {value}; stopped without saving. "
            f"The last good checkpoint is step {last_checkpoint}; lower {setting}.optim.lr "
            "(or raise warm-up) and rerun with the same save= to resume from it"
        )


@dataclass
class LoopState:
    step: int = 0
    consumed_samples: int = 0


@dataclass
class TrainingJob:
    """What a command supplies to `run_training`."""

    name: str
    """"train" or "distill": progress bar, TensorBoard prefix, and the checkpoint's state key."""
    setting: str
    """The config prefix of `cfg` ("train", "distill"), for messages."""
    save: Path
    cfg: TrainConfig
    model: Any
    """What the checkpoint holds (its `sharded_state_dict`)."""
    optimizer: Any
    scheduler: Any
    step: Callable[[Iterator], dict]
    """One optimizer step over the next global batch -> metrics (at least "loss" and "lr")."""
    evaluate: Callable[[int, int], dict]
    """(samples, micro-batch size) -> validation on the first samples: {"val_loss", "ppl", ...}."""
    batches: Callable[[int], Iterator]
    """Training microbatches, starting after this many consumed samples."""
    start: Callable[[], None]
    """Initial weights when there is nothing to resume (e.g. load a run dir's checkpoint)."""
    check_resumable: Callable[[], None]
    """Raise ConfigError if `save` holds an unfinished run of a different model."""
    write_metadata: Callable[[], None]
    """model.yaml and friends (rank 0, before the first step)."""
    summary: Callable[[dict, dict], dict]
    """(final evaluation, last step's metrics) -> the command's summary fields."""
    final_eval: Tuple[int, int]
    """(samples, micro-batch size) of the summary's evaluation: `evaluate`'s, so that one run
    dir shows one val_loss whichever command measured it."""
    seq_length: int
    """Tokens per sample, for `tokens_seen`."""
    guarded: Sequence[str] = ("loss",)
    """Metrics checked for NaN/Inf after every step, most specific first."""
    checkpoint_args: Optional[Callable[["LoopState"], Any]] = None
    """Megatron-LM's `args` namespace for a checkpoint at this state (checkpoint/megatron_lm.py)."""
    model_chunks: Sequence[Any] = ()
    """The DDP-wrapped chunks `step` trains: their parameters are brought up to date before each
    evaluation and save (train/optimizer.py `params_in_sync`)."""


def loop_problems(cfg: TrainConfig, setting: str, save: Optional[str], example: str,
                  ctx: ParallelContext) -> List[str]:
    """Every batch, interval and run-dir problem of a training loop (before anything is built)."""
    problems = []
    if save is None:
        problems.append(f"save is required: the run directory to write, e.g. save={example}")
    elif rd.is_complete(save):
        problems.append(f"save={save} already holds a finished run (summary.json); choose a new directory")
    per_step = cfg.micro_batch_size * ctx.dp_size
    for name in ("steps", "micro_batch_size", "eval_interval", "save_interval", "log_interval", "keep_last"):
        if getattr(cfg, name) < 1:
            problems.append(f"{setting}.{name}={getattr(cfg, name)} must be >= 1")
    if per_step > 0 and cfg.global_batch_size % per_step:
        problems.append(f"{setting}.global_batch_size={cfg.global_batch_size} must be a multiple of "
                        f"{setting}.micro_batch_size={cfg.micro_batch_size} x data-parallel size {ctx.dp_size}")
    if cfg.eval_samples < per_step:
        problems.append(f"{setting}.eval_samples={cfg.eval_samples} must be >= micro_batch_size x DP size "
                        f"({per_step})")
    return problems + optimizer_problems(cfg.optim, setting, ctx.dp_size, save)


def run_training(job: TrainingJob, ctx: ParallelContext) -> dict:
    """Run `job` to `job.cfg.steps` (or an early exit / preemption); return its summary."""
    t = job.cfg
    state = _resume_or_start(job, ctx)
    if ctx.is_main:
        job.write_metadata()
    batches = job.batches(state.consumed_samples)
    start, metrics, last_eval = time.time(), {}, None
    moe_metrics.clear()
    microbatches = t.global_batch_size // (t.micro_batch_size * ctx.dp_size)
    with TrainLogger(job.save, ctx, t, start_step=state.step, prefix=job.name) as logger, \
            PreemptionWatch(ctx) as watch, (AsyncSaves() if t.async_save else nullcontext()) as saves:
        while state.step < t.steps:
            metrics = {**job.step(batches), **moe_metrics.step_metrics(microbatches)}
            state.step += 1
            state.consumed_samples += t.global_batch_size
            _guard(job, metrics, state.step)
            logger.log_step(state.step, metrics)
            if saves is not None:
                saves.poll()  # commit a background save whose writes finished on every rank
            finished = state.step == t.steps
            if state.step % t.eval_interval == 0 or finished:
                with params_in_sync(job.model_chunks):
                    last_eval = (state.step, job.evaluate(t.eval_samples, t.micro_batch_size))
                logger.log_eval(state.step, last_eval[1])
            stop_early = t.exit_after_steps is not None and state.step >= t.exit_after_steps and not finished
            preempted = watch.should_stop() and not finished
            if finished or stop_early or preempted or state.step % t.save_interval == 0:
                last = finished or stop_early or preempted  # written and committed before the run ends
                if last and saves is not None:
                    saves.finish()
                _save(job, state, ctx, None if last else saves)
            if preempted:
                raise Preempted(state.step, watch.received, job.save)
            if stop_early:
                return {"stopped_at": state.step, "steps": t.steps, "resumable": True}
    loop_seconds = time.time() - start
    reuse = last_eval is not None and last_eval[0] == t.steps and job.final_eval == (t.eval_samples,
                                                                                      t.micro_batch_size)
    if reuse:
        final = last_eval[1]
    else:
        with params_in_sync(job.model_chunks):
            final = job.evaluate(*job.final_eval)
    summary = {
        **job.summary(final, metrics),
        "steps": state.step,
        "seq_length": job.seq_length,
        "tokens_seen": state.consumed_samples * job.seq_length,
        "train_seconds": round(loop_seconds, 1),
        "seconds": clock.elapsed(),
    }
    if ctx.is_main:
        rd.write_summary(job.save, summary)
    ctx.barrier()
    return summary


def _resume_or_start(job: TrainingJob, ctx: ParallelContext) -> LoopState:
    root = rd.checkpoint_root(job.save)
    if ckpt.latest_iteration(root) is None:
        job.start()
        # A bf16/fp16 optimizer cloned float32 main params from the weights it was built with;
        # `start` loaded others (load=, student.load=), which its first step would overwrite.
        # Megatron-LM's load_checkpoint does the same when it loads no optimizer state.
        job.optimizer.reload_model_params()
        return LoopState()
    job.check_resumable()
    loaded = ckpt.load_checkpoint(root, job.model, ctx, job.optimizer, job.scheduler,
                                  fully_parallel=job.cfg.fully_parallel_load)
    state = LoopState(**loaded["minitron"][f"{job.name}_state"])
    if ctx.is_main:
        print(f"resuming {job.save} from step {state.step}", flush=True)
    return state


def _guard(job: TrainingJob, metrics: Dict[str, float], step: int) -> None:
    """Stop on the first non-finite guarded metric. Every rank sees the same reduced
    values, so all ranks stop together; nothing is saved after a bad step."""
    for name in job.guarded:
        value = metrics.get(name)
        if value is not None and not math.isfinite(value):
            last = ckpt.latest_iteration(rd.checkpoint_root(job.save))
            raise TrainingDiverged(step, name, value, last, job.setting)


def _save(job: TrainingJob, state: LoopState, ctx: ParallelContext, saves: Optional[AsyncSaves]) -> None:
    """Save this step: in the background with `saves` (committed at a later poll), else now."""
    extra = {f"{job.name}_state": {"step": state.step, "consumed_samples": state.consumed_samples}}
    args = job.checkpoint_args(state) if job.checkpoint_args else None
    with params_in_sync(job.model_chunks):
        ckpt.save_checkpoint(rd.checkpoint_root(job.save), state.step, job.model, ctx, job.optimizer,
                             job.scheduler, extra, keep_last=job.cfg.keep_last, args=args,
                             fully_parallel=job.cfg.fully_parallel_save, async_saves=saves)
