"""`train`: pretrain a GPT model (how the tiny teacher for every other stage is made).

Read top to bottom: validate -> data -> model -> the training job -> the driver.
"""

from pathlib import Path

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import TrainCommand
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train import setup
from minitron_megatron.train.driver import TrainingJob, loop_problems, run_training
from minitron_megatron.train.step import evaluate_loss, train_step


def validate_train(cfg: TrainCommand, ctx: ParallelContext) -> int:
    """Check batch, evaluation and run-dir settings; return microbatches per step."""
    t = cfg.train
    problems = loop_problems(t, "train", cfg.save, "runs/teacher", ctx)
    problems += setup.evaluate_problems(cfg.evaluate, ctx)
    if problems:
        raise ConfigError(problems)
    return t.global_batch_size // (t.micro_batch_size * ctx.dp_size)


def pretrain(cfg: TrainCommand, ctx: ParallelContext) -> dict:
    """Train `cfg.model` on `cfg.data`, resuming an unfinished `cfg.save`; return the summary."""
    num_microbatches = validate_train(cfg, ctx)
    t, save = cfg.train, Path(cfg.save)
    run = setup.prepare_run(cfg, ctx, num_train_samples=t.steps * t.global_batch_size,
                            num_valid_samples=max(t.eval_samples, cfg.evaluate.samples))
    model, ddp, optimizer, scheduler = setup.trainable_model(run, cfg, ctx, t.optim, t.steps, t.global_batch_size)
    seq, mbs = run.seq_length, t.micro_batch_size

    def evaluate(num_samples: int, micro_batch_size: int) -> dict:
        batches = run.valid_batches(micro_batch_size, ctx, num_samples)
        return evaluate_loss([ddp], batches, ctx, len(batches), micro_batch_size, seq)

    def start() -> None:
        if cfg.load:
            ckpt.load_checkpoint(rd.checkpoint_root(cfg.load), model, ctx)

    job = TrainingJob(
        name="train", setting="train", save=save, cfg=t, model=model, optimizer=optimizer, scheduler=scheduler,
        step=lambda batches: train_step([ddp], optimizer, scheduler, batches, ctx, num_microbatches, mbs, seq),
        evaluate=evaluate,
        batches=lambda consumed: setup.train_batches(run, mbs, ctx, consumed),
        start=start,
        check_resumable=lambda: setup.check_same_model(cfg.save, run, "model"),
        write_metadata=lambda: rd.write_model_yaml(save, run.model_cfg, run.padded_vocab, run.tokenizer_path,
                                                   origin=cfg.load, seq_length=seq),
        summary=lambda final, metrics: {"val_loss": final["val_loss"], "ppl": final["ppl"],
                                        "train_loss": metrics.get("loss"), "params": run.params},
        final_eval=(cfg.evaluate.samples, cfg.evaluate.micro_batch_size),
        seq_length=seq,
        checkpoint_args=lambda state: setup.megatron_lm_args(run, t, ctx, state.consumed_samples, state.step),
        model_chunks=[ddp],
    )
    return run_training(job, ctx)
