"""`run` (python -m minitron_megatron.run [recipe=quick]): the Minitron recipe on the embedded default.

train (or reuse) the tiny teacher -> importance -> trim to about half the parameters
-> distil, print a table of the three models' val_loss (each stage's summary scores the
same `evaluate.samples` validation samples), then the JSON summary. One process, one
runtime: stages are library calls.
"""

import time
from dataclasses import fields
from pathlib import Path

from minitron_megatron.runtime import clock


PARAMS_FIELD = {"teacher": "params", "pruned": "params_after", "student": "params"}


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
    clock.restart()  # the stage's run dir reports its own wall time
    body()
    return {"seconds": round(time.time() - start, 1), "reused": False}


def run_recipe(cfg, ctx) -> dict:
    """Every stage of the recipe, in order; the summary compares the three models."""
    from minitron_megatron.config import commands as C
    from minitron_megatron.config.distill import ModelSource
    from minitron_megatron.distill.loop import distill
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.recipes.prune import prune
    from minitron_megatron.train.loop import pretrain

    root = Path(cfg.save)
    dirs = {name: root / name for name in ("teacher", "pruned", "student")}
    teacher, pruned, student = (str(d) for d in dirs.values())
    stages = {
        "teacher": _stage("teacher", dirs["teacher"], lambda: pretrain(
            C.TrainCommand(**_common(cfg, save=teacher), train=cfg.train, evaluate=cfg.evaluate), ctx), ctx),
        "pruned": _stage("prune", dirs["pruned"], lambda: prune(
            C.PruneCommand(**_common(cfg, load=teacher, save=pruned), prune=cfg.prune, evaluate=cfg.evaluate),
            ctx), ctx),
        "student": _stage("distill", dirs["student"], lambda: distill(
            C.DistillCommand(**_common(cfg, save=student), teacher=ModelSource(load=teacher),
                             student=ModelSource(load=pruned), distill=cfg.distill, evaluate=cfg.evaluate),
            ctx), ctx),
    }
    for name, path in dirs.items():  # each summary's val_loss is `evaluate`'s measurement (evaluate.*)
        summary = rd.read_summary(path)
        stages[name].update(val_loss=summary["val_loss"], params=summary[PARAMS_FIELD[name]])
    if ctx.is_main:
        print(_table(stages), flush=True)
    return stages


def _table(stages: dict) -> str:
    rows = ["| model | val loss | params | stage seconds |", "|---|---|---|---|"]
    for name, s in stages.items():
        seconds = "reused" if s["reused"] else f"{s['seconds']:.0f}"
        rows.append(f"| {name} | {s['val_loss']:.4f} | {s['params']:,} | {seconds} |")
    return "\n".join(rows)
