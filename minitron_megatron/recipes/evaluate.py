"""`evaluate`: validation loss, perplexity and parameter count of a run directory, at any TP/PP."""

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import EvaluateCommand
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train import setup
from minitron_megatron.train.step import evaluate_loss


def evaluate_run(cfg: EvaluateCommand, ctx: ParallelContext) -> dict:
    """Load `cfg.load` at this TP/PP and score `evaluate.samples` validation samples."""
    if not cfg.load:
        raise ConfigError("load is required: the run directory to evaluate, e.g. load=runs/teacher")
    problems = setup.evaluate_problems(cfg.evaluate, ctx)
    if problems:
        raise ConfigError(problems)
    mbs = cfg.evaluate.micro_batch_size
    run = setup.prepare_run(cfg, ctx, num_train_samples=1, num_valid_samples=cfg.evaluate.samples)
    model = setup.build_model(run, cfg, ctx, init="none")
    ckpt.load_checkpoint(rd.checkpoint_root(cfg.load), model, ctx)
    batches = run.valid_batches(mbs, ctx)
    result = evaluate_loss([model], batches, ctx, len(batches), mbs, run.seq_length)
    return {"val_loss": result["val_loss"], "ppl": result["ppl"], "params": run.params, "tokens": result["tokens"],
            "seq_length": run.seq_length}
