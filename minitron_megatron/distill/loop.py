"""`distill`: retrain a (pruned) student from its teacher with knowledge distillation.

Read top to bottom: check -> data -> teacher + student -> resume -> loop -> summary.
The loop is `train`'s: Megatron DDP + optimizer on the student only, warm-up +
cosine LR, clipping, periodic validation, exact-resume checkpoints of the
student (a normal run dir: `evaluate load=SAVE` reads it), plus a NaN/Inf guard.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import DistillCommand
from minitron_megatron.distill.intermediate import build_projection
from minitron_megatron.distill.model import DistillationModel
from minitron_megatron.distill.objective import DistillLoss
from minitron_megatron.distill.setup import DistillInputs, prepare_distill
from minitron_megatron.distill.step import distill_train_step, evaluate_distill
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train.logger import TrainLogger
from minitron_megatron.train.setup import train_batches

GUARDED = ("kd_loss", "lm_loss", "is_loss", "loss", "grad_norm")
"""Checked for NaN/Inf after every step, most specific first (the first bad one is named)."""


class TrainingDiverged(RuntimeError):
    """A loss component became NaN/Inf; the last committed checkpoint is the last good one."""

    def __init__(self, step: int, component: str, value: float, last_checkpoint):
        self.step, self.component, self.last_checkpoint = step, component, last_checkpoint
        super().__init__(
            f"distillation diverged at step {step}: {component} = {value}; stopped without saving. "
            f"The last good checkpoint is step {last_checkpoint}; lower distill.train.optim.lr "
            "(or raise warm-up) and rerun with the same save= to resume from it"
        )


@dataclass
class DistillState:
    step: int = 0
    consumed_samples: int = 0


def build_distillation_model(inputs: DistillInputs, cfg: DistillCommand, ctx: ParallelContext) -> DistillationModel:
    """Student (weights loaded later: from student.load, or from save= on resume) and the
    loaded, frozen teacher, this rank's pipeline stage of each."""
    from minitron_megatron.distill.teacher import apply_teacher_precision
    from minitron_megatron.model import build_gpt_model, count_model_parameters

    run = inputs.run
    student = build_gpt_model(run.model_cfg, ctx, cfg.parallel, run.padded_vocab)
    run.params = count_model_parameters(student, ctx)
    teacher = build_gpt_model(inputs.teacher.cfg, ctx, inputs.teacher_parallel, inputs.teacher.padded_vocab)
    # Megatron-LM casts a whole low-precision model with Float16Module; without it the local
    # spec's torch norms stay float32, so cast every parameter to the teacher's dtype here.
    teacher = teacher.to(teacher.config.params_dtype)
    ckpt.load_checkpoint(rd.checkpoint_root(inputs.teacher.path), teacher, ctx)
    teacher = apply_teacher_precision(teacher, cfg.teacher.precision)
    projection = None
    if inputs.use_projection:
        projection = build_projection(run.model_cfg.hidden_size, inputs.teacher.cfg.hidden_size,
                                      student.config.params_dtype, ctx.device, cfg.seed,
                                      cfg.parallel.sequence_parallel)
    return DistillationModel(student, teacher, cfg.distill, true_vocab_size=run.model_cfg.vocab_size,
                             tp_group=ctx.tp_group, pp_size=ctx.pp_size, layer_pairs=inputs.layer_pairs,
                             projection=projection)


def distill(cfg: DistillCommand, ctx: ParallelContext) -> dict:
    """Distil `student.load` from `teacher.load` on `data`, resuming an unfinished `save`."""
    from minitron_megatron.train.optimizer import build_optimizer, wrap_ddp

    inputs = prepare_distill(cfg, ctx)
    t, save, run = cfg.distill.train, Path(cfg.save), inputs.run
    model = build_distillation_model(inputs, cfg, ctx)
    ddp = wrap_ddp(model, model.config)
    optimizer, scheduler = build_optimizer([ddp], t.optim, model.config, t.steps)
    state = _start_state(cfg, inputs, model, optimizer, scheduler, ctx)
    if ctx.is_main:
        rd.write_model_yaml(save, run.model_cfg, run.padded_vocab, run.tokenizer_path)
    loss = DistillLoss(cfg.distill, has_state_loss=bool(inputs.layer_pairs))
    seq, mbs = run.model_cfg.seq_length, t.micro_batch_size
    batches = train_batches(run, mbs, ctx, state.consumed_samples)
    logger = TrainLogger(save, ctx, t, start_step=state.step, prefix="distill")
    evaluate = lambda: evaluate_distill([ddp], run.valid_batches(mbs, ctx), ctx,
                                        t.eval_samples // (mbs * ctx.dp_size), mbs, seq, loss)
    start, last_eval, metrics = time.time(), None, {}
    try:
        while state.step < t.steps:
            metrics = distill_train_step([ddp], optimizer, scheduler, batches, ctx, inputs.num_microbatches,
                                         mbs, seq, loss)
            state.step += 1
            state.consumed_samples += t.global_batch_size
            _guard(metrics, state.step, save)
            logger.log_step(state.step, metrics)
            if state.step % t.eval_interval == 0 or state.step == t.steps:
                last_eval = evaluate()
                logger.log_eval(state.step, last_eval)
            finished = state.step == t.steps
            stop_early = t.exit_after_steps is not None and state.step >= t.exit_after_steps and not finished
            if finished or stop_early or state.step % t.save_interval == 0:
                _save(save, state, model, optimizer, scheduler, ctx)
            if stop_early:
                return {"stopped_at": state.step, "steps": t.steps, "resumable": True}
    finally:
        logger.close()
    last_eval = last_eval or evaluate()  # resumed from a final checkpoint whose summary was not written
    summary = {
        "val_loss": last_eval["val_loss"],
        "kd_loss": last_eval["val_kd_loss"],
        "ppl": last_eval["ppl"],
        "train_loss": metrics.get("loss"),
        "train_kd_loss": metrics.get("kd_loss"),
        "params": run.params,
        "steps": state.step,
        "seconds": round(time.time() - start, 1),
        "tokens_seen": state.consumed_samples * seq,
    }
    if "val_is_loss" in last_eval:
        summary["is_loss"] = last_eval["val_is_loss"]
    if ctx.is_main:
        rd.write_summary(save, summary)
    ctx.barrier()
    return summary


def _guard(metrics: dict, step: int, save: Path) -> None:
    """Stop on the first non-finite loss component. Every rank sees the same reduced
    values, so all ranks stop together; nothing is saved after a bad step."""
    for name in GUARDED:
        value = metrics.get(name)
        if value is not None and not math.isfinite(value):
            raise TrainingDiverged(step, name, value, ckpt.latest_iteration(rd.checkpoint_root(save)))


def _start_state(cfg: DistillCommand, inputs: DistillInputs, model: DistillationModel, optimizer, scheduler,
                 ctx: ParallelContext) -> DistillState:
    """Resume an unfinished save dir (student, projection, optimizer, schedule, RNG);
    else start from the student run's weights."""
    root = rd.checkpoint_root(cfg.save)
    if ckpt.latest_iteration(root) is not None:
        _check_same_student(cfg.save, inputs)
        loaded = ckpt.load_checkpoint(root, model, ctx, optimizer, scheduler)
        state = DistillState(**loaded["minitron"]["distill_state"])
        if ctx.is_main:
            print(f"resuming {cfg.save} from step {state.step}", flush=True)
        return state
    ckpt.load_checkpoint(rd.checkpoint_root(cfg.student.load), model.module, ctx)
    return DistillState()


def _check_same_student(save: str, inputs: DistillInputs) -> None:
    saved_cfg, padded, _ = rd.read_model_yaml(save)
    run = inputs.run
    if saved_cfg.resolved() != run.model_cfg.resolved() or padded != run.padded_vocab:
        raise ConfigError(f"save={save} holds an unfinished run of a different student; resume it with "
                          "the same student.load, or choose a new save directory")


def _save(save: Path, state: DistillState, model, optimizer, scheduler, ctx: ParallelContext) -> None:
    extra = {"distill_state": {"step": state.step, "consumed_samples": state.consumed_samples}}
    ckpt.save_checkpoint(rd.checkpoint_root(save), state.step, model, ctx, optimizer, scheduler, extra)
