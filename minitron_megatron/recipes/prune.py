"""`prune`: importance, then trimming, of ONE loaded model.

Read top to bottom: check every setting -> data (built once) -> build and load the
model (read once) -> importance scores -> trim -> zero-shot eval -> save.
`prune.stage=importance` stops after the scores; `prune.stage=trim` reuses the scores
of `prune.scores=RUN_DIR` (or makes a random/magnitude plan).

Depth metrics are computed only when needed (`prune.importance.depth_metrics=null`, the
default): a width-only target gets block importance alone (free, from the calibration
pass), a target that cuts `num_layers` adds `prune.depth_metric`; the loss-based ones
(loss_drop, contiguous) cost extra validation passes. `stage=importance` computes all of
them, since its scores may serve any later target. A list the user sets is computed as given.
"""

import time
from dataclasses import replace
from typing import List, Optional

from minitron_megatron.checkpoint.resident import ResidentModels, resident_key
from minitron_megatron.config.commands import PruneCommand
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import DEPTH_METRICS, ImportanceConfig, PruneConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.importance.estimate import validate_importance
from minitron_megatron.importance.io import load_importance
from minitron_megatron.importance.stage import importance_batches, score_model
from minitron_megatron.plan.guard import refuse_prune_if_over
from minitron_megatron.runtime import clock
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train import setup
from minitron_megatron.trim.plan import check_scores
from minitron_megatron.trim.stage import check_trim_settings, load_source, source_model, source_parallel, trim_model

STAGES = ("all", "importance", "trim")


def needed_depth_metrics(depth_metric: str, cuts_layers: bool) -> List[str]:
    """The depth metrics a target needs: block importance (accumulated during the calibration
    pass, so nearly free) and, when layers are cut by ranking, the metric that ranks them."""
    metrics = ["block_importance"]
    if cuts_layers and depth_metric not in metrics:
        metrics.append(depth_metric)
    return metrics


def resolve_importance(p: PruneConfig, source_cfg: ModelConfig, new_cfg: Optional[ModelConfig]) -> ImportanceConfig:
    """`p.importance` with `depth_metrics` resolved: the user's list, or (None) what the
    target `new_cfg` needs; with no target (stage=importance) every metric."""
    icfg = p.importance
    if icfg.depth_metrics is not None:
        return icfg
    if new_cfg is None:
        return replace(icfg, depth_metrics=list(DEPTH_METRICS))
    cuts_layers = new_cfg.num_layers < source_cfg.num_layers and p.target.drop_layers is None
    return replace(icfg, depth_metrics=needed_depth_metrics(p.depth_metric, cuts_layers))


def _check(cfg: PruneCommand, ctx: ParallelContext):
    """Every problem of every stage, in one ConfigError, before any data or model: returns the
    pruned architecture (None for stage=importance), whether importance is computed here, and
    the importance settings with their depth metrics resolved."""
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
    icfg = p.importance
    if scoring:
        try:
            source_cfg = source_model(cfg)[0]
            # stage=importance has no target (every metric); a target that failed validation is
            # judged width-only, so its messages are not followed by ones about metrics.
            target_cfg = None if p.stage == "importance" else (new_cfg or source_cfg)
            icfg = resolve_importance(p, source_cfg, target_cfg)
            validate_importance(icfg, source_cfg.num_layers)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # both checks read `load`: its problems once
    return new_cfg, scoring, icfg


def prune(cfg: PruneCommand, ctx: ParallelContext, resident: Optional[ResidentModels] = None) -> dict:
    """Score and/or trim `cfg.load` into `cfg.save`; returns the summary.

    `resident`: models kept loaded across in-process stages (the search's): `cfg.load` is
    borrowed from it (loaded there on first use) and left as it was."""
    new_cfg, scoring, icfg = _check(cfg, ctx)
    cfg = replace(cfg, prune=replace(cfg.prune, importance=icfg))  # never a None list past here
    p = cfg.prune
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
    refuse_prune_if_over(run.model_cfg, new_cfg, ctx, parallel, cfg.parallel, run.padded_vocab, run.seq_length,
                         icfg.micro_batch_size if scoring else cfg.evaluate.micro_batch_size,
                         memory_check=p.memory_check)  # on CUDA: before the checkpoint is read
    if resident is None:
        model = load_source(run, cfg, ctx, parallel)
    else:
        key = resident_key(cfg.load, run.model_cfg, parallel)
        model = resident.get(key, lambda: load_source(run, cfg, ctx, parallel))
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
                      extra_summary={"importance_seconds": importance_seconds}, release_source=resident is None)
