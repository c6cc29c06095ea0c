"""The importance stage on a run directory: load, score, write importance.* and plots.

`python -m minitron_megatron.prune prune.stage=importance` calls this (the CLI lives in cli/).
"""

from pathlib import Path

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import CommonConfig
from minitron_megatron.config.prune import ImportanceConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.importance.estimate import (
    ImportanceResult,
    batches_fn,
    estimate_importance,
    needs_validation_data,
    validate_importance,
)
from minitron_megatron.importance.io import save_importance
from minitron_megatron.importance.report import format_summary, save_plots
from minitron_megatron.runtime.context import ParallelContext


def run_importance_stage(cfg: CommonConfig, icfg: ImportanceConfig, ctx: ParallelContext,
                         verbose: bool = True) -> ImportanceResult:
    """Score `cfg.load` on `icfg.calibration_samples` training samples; write into `cfg.save` if set.

    Calibration samples come from the training split, loss-based depth metrics use the
    first `icfg.depth_samples` validation samples. All checks run before the model is built.
    """
    from minitron_megatron.train import setup

    if not cfg.load:
        raise ConfigError("load is required: the run directory to score, e.g. load=runs/teacher")
    run = setup.prepare_run(cfg, ctx, num_train_samples=icfg.calibration_samples,
                            num_valid_samples=icfg.depth_samples)
    validate_importance(icfg, run.model_cfg.num_layers)
    mbs = icfg.micro_batch_size
    calib = batches_fn(run.train_ds, icfg.calibration_samples, mbs, ctx, "prune.importance.calibration_samples")
    valid = None
    if needs_validation_data(icfg):
        valid = batches_fn(run.valid_ds, icfg.depth_samples, mbs, ctx, "prune.importance.depth_samples")
    model = setup.build_model(run, cfg, ctx)
    ckpt.load_checkpoint(rd.checkpoint_root(cfg.load), model, ctx)
    result = estimate_importance(model, icfg, run.model_cfg, ctx, calib, valid)
    result.meta["source"] = str(cfg.load)
    result.meta["padded_vocab_size"] = run.padded_vocab
    if ctx.is_main:
        if cfg.save:
            save_importance(result.scores, result.meta, Path(cfg.save))
            save_plots(result.scores, result.meta, Path(cfg.save))
        if verbose:
            print(format_summary(result.scores, result.meta), flush=True)
    ctx.barrier()
    return result
