"""`train`: pretrain a GPT model (how the tiny teacher for every other stage is made).

Read top to bottom: validate -> data -> model -> resume -> loop -> summary.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import TrainCommand
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train import setup
from minitron_megatron.train.logger import TrainLogger
from minitron_megatron.train.step import evaluate_loss, train_step


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


def validate_train(cfg: TrainCommand, ctx: ParallelContext) -> int:
    """Check batch and run-dir settings; return microbatches per step."""
    t = cfg.train
    problems = []
    if cfg.save is None:
        problems.append("save is required: the run directory to write, e.g. save=runs/teacher")
    elif rd.is_complete(cfg.save):
        problems.append(f"save={cfg.save} already holds a finished run (summary.json); choose a new directory")
    per_step = t.micro_batch_size * ctx.dp_size
    if t.global_batch_size % per_step:
        problems.append(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x data-parallel size {ctx.dp_size}"
        )
    for name in ("steps", "micro_batch_size", "eval_interval", "save_interval", "log_interval"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name}={getattr(t, name)} must be >= 1")
    if t.eval_samples < t.micro_batch_size * ctx.dp_size:
        problems.append(f"train.eval_samples={t.eval_samples} must be >= micro_batch_size x DP size ({per_step})")
    if problems:
        raise ConfigError(problems)
    return t.global_batch_size // per_step


def pretrain(cfg: TrainCommand, ctx: ParallelContext) -> dict:
    """Train `cfg.model` on `cfg.data`, resuming an unfinished `cfg.save`; return the summary."""
    num_microbatches = validate_train(cfg, ctx)
    t, save = cfg.train, Path(cfg.save)
    run = setup.prepare_run(cfg, ctx, num_train_samples=t.steps * t.global_batch_size,
                            num_valid_samples=t.eval_samples)
    model, ddp, optimizer, scheduler = setup.trainable_model(run, cfg, ctx, t.optim, t.steps)
    state = _start_state(cfg, run, ddp, model, optimizer, scheduler, ctx)
    if ctx.is_main:
        rd.write_model_yaml(save, run.model_cfg, run.padded_vocab, run.tokenizer_path)
    seq, mbs = run.model_cfg.seq_length, t.micro_batch_size
    batches = setup.train_batches(run, mbs, ctx, state.consumed_samples)
    logger = TrainLogger(save, ctx, t, start_step=state.step)
    evaluate = lambda: evaluate_loss([ddp], run.valid_batches(mbs, ctx), ctx,
                                     t.eval_samples // (mbs * ctx.dp_size), mbs, seq)
    start, last_eval, metrics = time.time(), None, {}
    while state.step < t.steps:
        metrics = train_step([ddp], optimizer, scheduler, batches, ctx, num_microbatches, mbs, seq)
        state.step += 1
        state.consumed_samples += t.global_batch_size
        logger.log_step(state.step, metrics)
        if state.step % t.eval_interval == 0 or state.step == t.steps:
            last_eval = evaluate()
            logger.log_eval(state.step, last_eval)
        finished = state.step == t.steps
        stop_early = t.exit_after_steps is not None and state.step >= t.exit_after_steps and not finished
        if finished or stop_early or state.step % t.save_interval == 0:
            _save(save, state, model, optimizer, scheduler, ctx)
        if stop_early:
            logger.close()
            return {"stopped_at": state.step, "steps": t.steps, "resumable": True}
    logger.close()
    last_eval = last_eval or evaluate()  # resumed from a final checkpoint whose summary was not written
    summary = {
        "val_loss": last_eval["val_loss"],
        "ppl": last_eval["ppl"],
        "train_loss": metrics.get("loss"),
        "params": run.params,
        "steps": state.step,
        "seconds": round(time.time() - start, 1),
        "tokens_seen": state.consumed_samples * seq,
    }
    if ctx.is_main:
        rd.write_summary(save, summary)
    ctx.barrier()
    return summary


def _start_state(cfg: TrainCommand, run, ddp, model, optimizer, scheduler, ctx) -> TrainState:
    """Resume an unfinished save dir; else start from `load` weights or from scratch."""
    root = rd.checkpoint_root(cfg.save)
    if ckpt.latest_iteration(root) is not None:
        _check_same_model(cfg.save, run)
        loaded = ckpt.load_checkpoint(root, model, ctx, optimizer, scheduler)
        state = TrainState(**loaded["minitron"]["train_state"])
        if ctx.is_main:
            print(f"resuming {cfg.save} from step {state.step}", flush=True)
        return state
    if cfg.load:
        ckpt.load_checkpoint(rd.checkpoint_root(cfg.load), model, ctx)
    return TrainState()


def _check_same_model(save: str, run) -> None:
    saved_cfg, padded, _ = rd.read_model_yaml(save)
    if saved_cfg.resolved() != run.model_cfg.resolved() or padded != run.padded_vocab:
        raise ConfigError(
            f"save={save} holds an unfinished run of a different model; resume it with the same "
            "model settings, or choose a new save directory"
        )


def _save(save: Path, state: TrainState, model, optimizer, scheduler, ctx: ParallelContext) -> None:
    extra = {"train_state": {"step": state.step, "consumed_samples": state.consumed_samples}}
    ckpt.save_checkpoint(rd.checkpoint_root(save), state.step, model, ctx, optimizer, scheduler, extra)
