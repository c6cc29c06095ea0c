"""python -m minitron_megatron.prune load=runs/teacher data=stdlib prune.target.hidden_size=96 save=runs/pruned

Two stages: importance (scores written to save/importance.*) then trim. With
`prune.stage=importance` it writes the scores and stops; with `prune.stage=trim` it
reuses the scores of `prune.scores=RUN_DIR` (or random/magnitude plans).
"""

from minitron_megatron.cli.app import hydra_entry

STAGES = ("all", "importance", "trim")


def prune_command(cfg, ctx) -> dict:
    """Importance and/or trim. Every setting is checked before the calibration pass."""
    from minitron_megatron.errors import ConfigError
    from minitron_megatron.importance.io import load_importance
    from minitron_megatron.importance.stage import run_importance_stage
    from minitron_megatron.trim.stage import check_trim_settings, trim_stage

    prune = cfg.prune
    if prune.stage not in STAGES:
        raise ConfigError(f"prune.stage={prune.stage!r} is not one of {list(STAGES)}")
    if prune.stage == "importance":
        result = run_importance_stage(cfg, prune.importance, ctx)
        return {"tokens": result.meta["calibration"]["tokens"], "layer_rankings": result.meta["layer_rankings"]}
    check_trim_settings(cfg, prune, ctx)  # target, dirs, method, evaluation: before any heavy pass
    scores = None
    if prune.method == "importance":
        if prune.stage == "all":
            scores = run_importance_stage(cfg, prune.importance, ctx).scores
        elif not prune.scores:
            raise ConfigError("prune.stage=trim with prune.method=importance needs prune.scores=RUN_DIR")
        else:
            scores = load_importance(prune.scores)[0]
    return trim_stage(cfg, prune, ctx, scores=scores, pp_layout=cfg.parallel.pp_layout,
                      eval_samples=cfg.evaluate.samples, eval_micro_batch_size=cfg.evaluate.micro_batch_size)


def main() -> None:
    hydra_entry("prune", "minitron_megatron.cli.prune:prune_command")()


if __name__ == "__main__":
    main()
