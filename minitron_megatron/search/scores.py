"""One importance run per round: `importance.*` in the round's dir serves every candidate.

The scores are `prune prune.stage=importance` of the round's starting model, written into
the round dir; each candidate's trim then reads them (`prune.stage=trim prune.scores=DIR`).
Scores already there (same source, every needed metric) are reused.
"""

from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from minitron_megatron.checkpoint.resident import ResidentModels
from minitron_megatron.config.commands import PruneCommand, SearchCommand
from minitron_megatron.config.prune import ImportanceConfig
from minitron_megatron.importance.io import has_importance, load_importance
from minitron_megatron.runtime import clock
from minitron_megatron.runtime.context import ParallelContext


def depth_metrics(cfg: SearchCommand, cuts_layers: bool) -> List[str]:
    """The user's `prune.importance.depth_metrics`, or what the round's candidates need: block
    importance, plus `prune.depth_metric` when some candidate has fewer layers. Judged over ALL
    the round's candidates, so every job of a multirun computes the same scores."""
    from minitron_megatron.recipes.prune import needed_depth_metrics

    if cfg.prune.importance.depth_metrics is not None:
        return list(cfg.prune.importance.depth_metrics)
    return needed_depth_metrics(cfg.prune.depth_metric, cuts_layers)


def _reusable(round_dir: Path, start: str, icfg: ImportanceConfig) -> bool:
    """Scores of the same model, aggregated the same way, with every needed depth metric."""
    if not has_importance(round_dir):
        return False
    scores, meta = load_importance(round_dir)
    same_aggregation = meta.get("aggregation") == {"seq": icfg.seq_agg, "batch": icfg.batch_agg}
    return (meta.get("source") == str(start) and same_aggregation
            and all(f"depth.{m}" in scores for m in icfg.depth_metrics))


def ensure_importance(cfg: SearchCommand, ctx: ParallelContext, round_dir: Path, start: str,
                      metrics: List[str], resident: Optional[ResidentModels] = None) -> None:
    """Score `start` into `round_dir` unless matching scores are there already (borrowing
    `start` from `resident`, where the candidates' trims find it again)."""
    from minitron_megatron.recipes.prune import prune
    from minitron_megatron.search.candidate import common

    icfg = replace(cfg.prune.importance, depth_metrics=metrics)
    if _reusable(round_dir, start, icfg):
        return
    if ctx.is_main:
        print(f"[importance] {start} -> {round_dir} (depth metrics {metrics})", flush=True)
    p = replace(cfg.prune, stage="importance", importance=icfg)
    clock.restart()
    prune(PruneCommand(**common(cfg, load=str(start), save=str(round_dir)), prune=p, evaluate=cfg.evaluate), ctx,
          resident=resident)
