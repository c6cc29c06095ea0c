"""python -m minitron_megatron.run [recipe=quick]: the Minitron recipe on the embedded default.

train (or reuse) the tiny teacher -> importance -> trim to about half the parameters
-> distil -> evaluate the three models on the same validation samples, print a table,
then the JSON summary. One process, one runtime: stages are library calls.
"""

import time
from dataclasses import fields
from pathlib import Path

from minitron_megatron.cli.app import hydra_entry


def _common(cfg, **overrides):
    from minitron_megatron.config.commands import CommonConfig

    values = {f.name: getattr(cfg, f.name) for f in fields(CommonConfig)}
    return {**values, **overrides}


def _stage(name: str, run_dir: Path, body, ctx) -> dict:
    """Run `body()` unless `run_dir` is complete; returns {seconds, reused}."""
    from minitron_megatron.checkpoint import run_dir as rd

    if rd.is_complete(run_dir):
        if ctx.is_main:
            print(f"[{name}] reusing {run_dir}", flush=True)
        return {"seconds": 0.0, "reused": True}
    if ctx.is_main:
        print(f"[{name}] -> {run_dir}", flush=True)
    start = time.time()
    body()
    return {"seconds": round(time.time() - start, 1), "reused": False}


def run_recipe(cfg, ctx) -> dict:
    """Every stage of the recipe, in order; the summary compares the three models."""
    from minitron_megatron.cli.distill import run_distill
    from minitron_megatron.cli.prune import prune_command
    from minitron_megatron.config import commands as C
    from minitron_megatron.config.distill import ModelSource
    from minitron_megatron.train.evaluate import evaluate_run
    from minitron_megatron.train.loop import pretrain

    root = Path(cfg.save)
    dirs = {name: root / name for name in ("teacher", "pruned", "student")}
    teacher, pruned, student = (str(d) for d in dirs.values())
    stages = {
        "teacher": _stage("teacher", dirs["teacher"], lambda: pretrain(
            C.TrainCommand(**_common(cfg, save=teacher), train=cfg.train), ctx), ctx),
        "pruned": _stage("prune", dirs["pruned"], lambda: prune_command(
            C.PruneCommand(**_common(cfg, load=teacher, save=pruned), prune=cfg.prune, evaluate=cfg.evaluate),
            ctx), ctx),
        "student": _stage("distill", dirs["student"], lambda: run_distill(
            C.DistillCommand(**_common(cfg, save=student), teacher=ModelSource(load=teacher),
                             student=ModelSource(load=pruned), distill=cfg.distill), ctx), ctx),
    }
    for name, path in dirs.items():
        result = evaluate_run(C.EvaluateCommand(**_common(cfg, load=str(path)), evaluate=cfg.evaluate), ctx)
        stages[name].update(val_loss=result["val_loss"], params=result["params"])
    if ctx.is_main:
        print(_table(stages), flush=True)
    return {name: stage for name, stage in stages.items()}


def _table(stages: dict) -> str:
    rows = ["| model | val loss | params | stage seconds |", "|---|---|---|---|"]
    for name, s in stages.items():
        seconds = "reused" if s["reused"] else f"{s['seconds']:.0f}"
        rows.append(f"| {name} | {s['val_loss']:.4f} | {s['params']:,} | {seconds} |")
    return "\n".join(rows)


def main() -> None:
    hydra_entry("run", "minitron_megatron.cli.run:run_recipe")()


if __name__ == "__main__":
    main()
