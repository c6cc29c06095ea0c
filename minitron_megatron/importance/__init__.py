"""Activation-based importance of heads, query groups, neurons, hidden channels and layers.

    result = estimate_importance(model, cfg.prune.importance, model_cfg, ctx, calib_fn, valid_fn)
    save_importance(result.scores, result.meta, run_dir)        # rank 0
    scores, meta = load_importance(run_dir)                      # the trimming stage

Hooks accumulate locally (collector.py), one reduction makes the scores global and
identical on every rank at any TP/PP/DP (reduce.py), depth metrics skip layers
(depth.py). Score names and shapes: minitron_megatron/config/prune.py.
"""

from minitron_megatron.importance.aggregation import AGGREGATIONS
from minitron_megatron.importance.estimate import (
    DEPTH_METRICS,
    ImportanceResult,
    batches_fn,
    estimate_importance,
    validate_importance,
)
from minitron_megatron.importance.io import has_importance, load_importance, save_importance
from minitron_megatron.importance.report import format_summary, save_plots
from minitron_megatron.importance.stage import run_importance_stage

__all__ = [
    "AGGREGATIONS",
    "DEPTH_METRICS",
    "ImportanceResult",
    "batches_fn",
    "estimate_importance",
    "format_summary",
    "has_importance",
    "load_importance",
    "run_importance_stage",
    "save_importance",
    "save_plots",
    "validate_importance",
]
