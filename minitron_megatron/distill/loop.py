"""`distill`: retrain a (pruned) student from its teacher with knowledge distillation.

Read top to bottom: check -> data -> teacher + student -> the training job -> the driver.
The driver is `train`'s (train/driver.py): Megatron DDP + optimizer on the student
only, warm-up + cosine LR, clipping, periodic validation, exact-resume checkpoints
of the student (a normal run dir: `evaluate load=SAVE` reads it), preemption, and a
NaN/Inf guard over every loss component.
"""

from pathlib import Path
from typing import Optional

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.resident import ResidentModels, resident_key
from minitron_megatron.config.commands import DistillCommand
from minitron_megatron.distill.intermediate import build_projection
from minitron_megatron.distill.model import DistillationModel
from minitron_megatron.distill.objective import DistillLoss
from minitron_megatron.distill.setup import DistillInputs, prepare_distill
from minitron_megatron.distill.step import distill_train_step, evaluate_distill
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train.driver import TrainingDiverged, TrainingJob, run_training
from minitron_megatron.train.setup import check_same_model, megatron_lm_args, train_batches

__all__ = ["TrainingDiverged", "build_distillation_model", "distill"]

GUARDED = ("kd_loss", "lm_loss", "is_loss", "router_loss", "loss", "grad_norm")
"""Checked for NaN/Inf after every step, most specific first (the first bad one is named)."""


def build_distillation_model(inputs: DistillInputs, cfg: DistillCommand, ctx: ParallelContext,
                             resident: Optional[ResidentModels] = None) -> DistillationModel:
    """Student (weights loaded later: from student.load, or from save= on resume) and the
    loaded, frozen teacher, this rank's pipeline stage of each. With `resident` (the search's)
    the teacher is borrowed from it, loaded there on first use."""
    from minitron_megatron.model import build_gpt_model, count_model_parameters

    run = inputs.run
    student = build_gpt_model(run.model_cfg, ctx, cfg.parallel, run.padded_vocab)
    run.params = count_model_parameters(student, ctx)
    # Each side in its own params_dtype (teacher.params_dtype / student.params_dtype; the build
    # casts every parameter, norms included, as Float16Module would). No Float16Module here:
    # it would cast the hidden teacher with the student (DistillationModel._apply), and the
    # last stage's per-token losses are float32 already. A checkpoint loads into either dtype.
    if resident is None:
        teacher = _load_teacher(inputs, cfg, ctx, init="random")
    else:  # init="none": the same model whichever stage of the search loads it first
        key = resident_key(inputs.teacher.path, inputs.teacher.cfg, inputs.teacher_parallel, cfg.teacher.precision)
        teacher = resident.get(key, lambda: _load_teacher(inputs, cfg, ctx, init="none"))
    projection = None
    if inputs.use_projection:
        projection = build_projection(run.model_cfg.hidden_size, inputs.teacher.cfg.hidden_size,
                                      student.config.params_dtype, ctx.device, cfg.seed,
                                      cfg.parallel.sequence_parallel)
    return DistillationModel(student, teacher, cfg.distill, true_vocab_size=run.model_cfg.vocab_size,
                             tp_group=ctx.tp_group, pp_size=ctx.pp_size, layer_pairs=inputs.layer_pairs,
                             projection=projection, router_pairs=inputs.router_pairs)


def _load_teacher(inputs: DistillInputs, cfg: DistillCommand, ctx: ParallelContext, init: str):
    from minitron_megatron.distill.teacher import apply_teacher_precision
    from minitron_megatron.model import build_gpt_model

    teacher = build_gpt_model(inputs.teacher.cfg, ctx, inputs.teacher_parallel, inputs.teacher.padded_vocab,
                              init=init)
    ckpt.load_checkpoint(rd.checkpoint_root(inputs.teacher.path), teacher, ctx)
    return apply_teacher_precision(teacher, cfg.teacher.precision)


def distill(cfg: DistillCommand, ctx: ParallelContext, resident: Optional[ResidentModels] = None) -> dict:
    """Distil `student.load` from `teacher.load` on `data`, resuming an unfinished `save`.

    `resident`: models kept loaded across in-process stages (the search's): the teacher is
    borrowed from it rather than read again."""
    from minitron_megatron.train.optimizer import build_optimizer, data_parallel_settings, wrap_ddp

    from minitron_megatron.plan.guard import refuse_if_over

    inputs = prepare_distill(cfg, ctx)
    t, save, run = cfg.distill, Path(cfg.save), inputs.run
    settings = data_parallel_settings(t.optim, "distill", ctx.dp_size, cfg.save)  # before the teacher loads
    # on CUDA: a plan larger than the device fails here, not after the load
    refuse_if_over(inputs, cfg, ctx, distributed_optimizer=settings.use_distributed_optimizer)
    model = build_distillation_model(inputs, cfg, ctx, resident)
    ddp = wrap_ddp(model, model.config, settings)
    optimizer, scheduler = build_optimizer([ddp], t.optim, model.config, t.steps, global_batch_size=t.global_batch_size)
    loss = DistillLoss(cfg.distill, has_state_loss=bool(inputs.layer_pairs))
    seq, mbs = run.seq_length, t.micro_batch_size

    def evaluate(num_samples: int, micro_batch_size: int) -> dict:
        batches = run.valid_batches(micro_batch_size, ctx, num_samples)
        return evaluate_distill([ddp], batches, ctx, len(batches), micro_batch_size, seq, loss)

    job = TrainingJob(
        name="distill", setting="distill", save=save, cfg=t, model=model, optimizer=optimizer,
        scheduler=scheduler,
        step=lambda batches: distill_train_step([ddp], optimizer, scheduler, batches, ctx,
                                                inputs.num_microbatches, mbs, seq, loss),
        evaluate=evaluate,
        batches=lambda consumed: train_batches(run, mbs, ctx, consumed),
        start=lambda: ckpt.load_checkpoint(rd.checkpoint_root(cfg.student.load), model.module, ctx),
        check_resumable=lambda: check_same_model(cfg.save, run, "student"),
        write_metadata=lambda: rd.write_model_yaml(save, run.model_cfg, run.padded_vocab, run.tokenizer_path,
                                                   origin=cfg.student.load, seq_length=seq),
        summary=lambda final, metrics: _summary(final, metrics, run.params),
        final_eval=(cfg.evaluate.samples, cfg.evaluate.micro_batch_size),
        seq_length=seq,
        checkpoint_args=lambda state: megatron_lm_args(run, t, ctx, state.consumed_samples, state.step),
        guarded=GUARDED,
        model_chunks=[ddp],
    )
    return run_training(job, ctx)


def _summary(final: dict, metrics: dict, params: int) -> dict:
    summary = {"val_loss": final["val_loss"], "kd_loss": final["val_kd_loss"], "ppl": final["ppl"],
               "train_loss": metrics.get("loss"), "train_kd_loss": metrics.get("kd_loss"), "params": params}
    for name in ("is_loss", "router_loss"):
        if f"val_{name}" in final:
            summary[name] = final[f"val_{name}"]
    return summary
