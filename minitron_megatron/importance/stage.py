"""The importance stage of `prune`: score a loaded model on calibration data, write importance.*.

`score_model` works on a model that is already built and loaded (prune scores and
trims the same model: one checkpoint read); `run_importance_stage` is the
stand-alone form that prepares the data and loads `cfg.load` itself.
"""

from pathlib import Path
from typing import Callable, List, Optional, Tuple

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

BatchesFn = Callable[[], List[dict]]


def importance_batches(run, icfg: ImportanceConfig, ctx: ParallelContext) -> Tuple[BatchesFn, Optional[BatchesFn]]:
    """(calibration, validation or None) batch functions over `run`'s datasets, checked now.

    Calibration samples come from the training split; the loss-based depth metrics use
    the first `icfg.depth_samples` validation samples.
    """
    mbs = icfg.micro_batch_size
    calib = batches_fn(run.train_ds, icfg.calibration_samples, mbs, ctx, "prune.importance.calibration_samples")
    valid = None
    if needs_validation_data(icfg):
        valid = batches_fn(run.valid_ds, icfg.depth_samples, mbs, ctx, "prune.importance.depth_samples")
    return calib, valid


def score_model(model, run, icfg: ImportanceConfig, ctx: ParallelContext, batches, source: str,
                save: Optional[str], verbose: bool = True) -> ImportanceResult:
    """Importance of the loaded `model`; writes importance.* (and plots) into `save` when given."""
    result = estimate_importance(model, icfg, run.model_cfg, ctx, *batches)
    result.meta["source"] = str(source)
    result.meta["padded_vocab_size"] = run.padded_vocab
    if ctx.is_main:
        if save:
            save_importance(result.scores, result.meta, Path(save))
            save_plots(result.scores, result.meta, Path(save))
        if verbose:
            print(format_summary(result.scores, result.meta), flush=True)
    ctx.barrier()
    return result


def run_importance_stage(cfg: CommonConfig, icfg: ImportanceConfig, ctx: ParallelContext,
                         verbose: bool = True) -> ImportanceResult:
    """Score `cfg.load` on `icfg.calibration_samples` training samples; write into `cfg.save` if set.

    All checks run before the model is built.
    """
    from minitron_megatron.train import setup

    if not cfg.load:
        raise ConfigError("load is required: the run directory to score, e.g. load=runs/teacher")
    run = setup.prepare_run(cfg, ctx, num_train_samples=icfg.calibration_samples,
                            num_valid_samples=icfg.depth_samples)
    validate_importance(icfg, run.model_cfg.num_layers)
    batches = importance_batches(run, icfg, ctx)
    model = setup.build_model(run, cfg, ctx, init="none")
    ckpt.load_checkpoint(rd.checkpoint_root(cfg.load), model, ctx)
    return score_model(model, run, icfg, ctx, batches, cfg.load, cfg.save, verbose)
