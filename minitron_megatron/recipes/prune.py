"""`prune`: importance, then trimming, of ONE loaded model.

Read top to bottom: check every setting -> data (built once) -> build and load the
model (read once) -> importance scores -> trim -> zero-shot eval -> save.
`prune.stage=importance` stops after the scores; `prune.stage=trim` reuses the scores
of `prune.scores=RUN_DIR` (or makes a random/magnitude plan).
"""

import time
from dataclasses import replace

from minitron_megatron.config.commands import PruneCommand
from minitron_megatron.errors import ConfigError
from minitron_megatron.importance.estimate import validate_importance
from minitron_megatron.importance.io import load_importance
from minitron_megatron.importance.stage import importance_batches, score_model
from minitron_megatron.runtime import clock
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train import setup
from minitron_megatron.trim.plan import check_scores
from minitron_megatron.trim.stage import check_trim_settings, load_source, source_model, source_parallel, trim_model

STAGES = ("all", "importance", "trim")


def _check(cfg: PruneCommand, ctx: ParallelContext):
    """Every problem of every stage, in one ConfigError, before any data or model: returns the
    pruned architecture (None for stage=importance) and whether importance is computed here."""
    p = cfg.prune
    if p.stage not in STAGES:
        raise ConfigError(f"prune.stage={p.stage!r} is not one of {list(STAGES)}")
    scoring = p.stage == "importance" or (p.stage == "all" and p.method == "importance")
    problems, new_cfg = [], None
    if not cfg.load:
        raise ConfigError("load is required: the run directory to prune, e.g. load=runs/teacher")
    if p.stage != "importance":
        try:
            new_cfg = check_trim_settings(cfg, p, ctx)
        except ConfigError as err:
            problems += err.problems
    if p.stage == "trim" and p.method == "importance" and not p.scores:
        problems.append("prune.stage=trim with prune.method=importance needs prune.scores=RUN_DIR")
    if scoring:
        try:
            validate_importance(p.importance, source_model(cfg)[0].num_layers)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return new_cfg, scoring


def prune(cfg: PruneCommand, ctx: ParallelContext) -> dict:
    """Score and/or trim `cfg.load` into `cfg.save`; returns the summary."""
    p, icfg = cfg.prune, cfg.prune.importance
    new_cfg, scoring = _check(cfg, ctx)
    eval_samples = cfg.evaluate.samples if p.stage != "importance" else 0
    depth_samples = icfg.depth_samples if scoring else 0
    # `parallel.pp_layout` describes the pruned model; the source gets the even split.
    parallel = cfg.parallel if p.stage == "importance" else source_parallel(cfg)
    run = setup.prepare_run(replace(cfg, parallel=parallel), ctx,
                            num_train_samples=icfg.calibration_samples if scoring else 1,
                            num_valid_samples=max(eval_samples, depth_samples, 1))
    batches = importance_batches(run, icfg, ctx) if scoring else None
    scores = load_importance(p.scores)[0] if p.stage == "trim" and p.method == "importance" else None
    if scores is not None:
        check_scores(run.model_cfg, scores, sorted(scores))  # wrong shapes fail before loading
    model = load_source(run, cfg, ctx, parallel)
    importance_seconds = None
    if scoring:
        start = time.time()
        result = score_model(model, run, icfg, ctx, batches, cfg.load, cfg.save)
        scores, importance_seconds = result.scores, round(time.time() - start, 2)
        if p.stage == "importance":
            return {"tokens": result.meta["calibration"]["tokens"], "layer_rankings": result.meta["layer_rankings"],
                    "importance_seconds": importance_seconds, "seconds": clock.elapsed()}
    return trim_model(model, run, cfg, p, ctx, new_cfg, scores=scores, pp_layout=cfg.parallel.pp_layout,
                      eval_samples=eval_samples, eval_micro_batch_size=cfg.evaluate.micro_batch_size,
                      extra_summary={"importance_seconds": importance_seconds})
