"""`run` (python -m minitron_megatron.run [recipe=quick]): the Minitron recipe with its evidence.

Read top to bottom: check the settings -> train (or reuse) the teacher -> architecture
search (importance once; each candidate pruned, scored, distilled `search.steps` steps)
-> the winner's full distillation from its pruned weights -> two baselines on the
student's tokens: the winner's architecture from random weights (`scratch`) and the
winner's pruned weights retrained with plain CE (`ce`) -> report.md with plots, the
table, then the JSON summary. One process, one runtime: stages are the commands' library
calls. Every stage is its own run dir under `save`; a finished one is reused, an
unfinished one resumes (the training driver and the search do it).

```
SAVE/teacher/  SAVE/search/ (importance.*, candidates/<i>/{pruned,student}, report.md)
SAVE/student/  SAVE/scratch/  SAVE/ce/  SAVE/report.md + *.png
```
Every model's val_loss is `evaluate`'s measurement on the same `evaluate.samples`.
"""

import time
from dataclasses import fields, replace
from pathlib import Path

from minitron_megatron.runtime import clock


def _common(cfg, **overrides):
    from minitron_megatron.config.commands import derived_common

    return derived_common(cfg, **overrides)


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
    result = body()
    if isinstance(result, dict) and result.get("resumable"):
        raise _Stopped(name, result)
    return {"seconds": round(time.time() - start, 1), "reused": False}


class _Stopped(Exception):
    """A stage saved and stopped early (exit_after_steps, preemption): so does the recipe."""

    def __init__(self, stage: str, summary: dict):
        super().__init__(stage)
        self.summary = {"stopped": stage, **summary}


def _loop(distill, optim=None):
    """The TrainConfig part of `distill` (steps, batch sizes, evaluations, optim): the
    baselines train on exactly the student's samples, in the same order."""
    from minitron_megatron.config.train import TrainConfig

    loop = TrainConfig(**{f.name: getattr(distill, f.name) for f in fields(TrainConfig)})
    return loop if optim is None else replace(loop, optim=optim)


def _search_command(cfg, teacher: str, save: str):
    from minitron_megatron.config.commands import SearchCommand

    return SearchCommand(**_common(cfg, load=teacher, save=save), search=cfg.search, prune=cfg.prune,
                         distill=cfg.distill, evaluate=cfg.evaluate)


def check_run(cfg, ctx) -> None:
    """The settings that need no teacher (the search's own, the loops', the teacher source's,
    generation's), before any training or import: one ConfigError with every problem. The
    budgets are checked against the teacher by the searches themselves, after the teacher
    exists (the teacher is then reused)."""
    from minitron_megatron.errors import ConfigError
    from minitron_megatron.recipes.generate import generate_problems
    from minitron_megatron.recipes.teacher import teacher_problems
    from minitron_megatron.search.command import setting_problems
    from minitron_megatron.train.driver import loop_problems

    save = Path(cfg.save or ".")
    problems = [] if cfg.save else ["save is required: the recipe's directory, e.g. save=runs/recipe"]
    problems += teacher_problems(cfg) + generate_problems(cfg)
    if cfg.load:
        problems.append(f"load={cfg.load}: run takes its teacher from teacher.from_gguf / teacher.from_hf (or "
                        "trains one); to start from a run dir, use search load=RUN and distill")
    for budget in cfg.extra_budgets:
        if budget <= 0 or budget == cfg.search.param_budget:
            problems.append(f"extra_budgets: {budget} must be > 0 and differ from search.param_budget="
                            f"{cfg.search.param_budget} (the main search)")
    problems += setting_problems(_search_command(cfg, str(save / "teacher"), str(save / "search")), ctx)
    problems += [p for p in loop_problems(cfg.distill, "distill", str(save / "student"), "", ctx)
                 if not p.startswith("save=")]  # a finished stage is reused, not an error
    if cfg.scratch.optim.warmup_steps >= cfg.distill.steps:
        problems.append(f"scratch.optim.warmup_steps={cfg.scratch.optim.warmup_steps} must be below "
                        f"distill.steps={cfg.distill.steps} (the baseline trains for distill.steps)")
    if problems:
        raise ConfigError(sorted(set(problems), key=problems.index))


def run_recipe(cfg, ctx) -> dict:
    """Every stage of the recipe, in order; the summary has one entry per model plus `report`."""
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.recipes import run_report

    check_run(cfg, ctx)
    try:
        models = _stages(cfg, ctx)
    except _Stopped as stop:
        return stop.summary  # rerun to resume
    report = Path(cfg.save) / run_report.REPORT_MD
    if ctx.is_main:
        run_report.write_report(Path(cfg.save), models, rd.read_summary(Path(cfg.save) / "search"), cfg)
        print(f"[report] {report}", flush=True)
        print(run_report.table(models), flush=True)  # the last human output: the JSON line follows
    ctx.barrier()
    summary = {**models, "report": str(report)}
    if "generations" in summary:  # the texts are in report.md; the line names their file
        from minitron_megatron.recipes.generate import GENERATIONS

        summary["generations"] = str(Path(cfg.save) / GENERATIONS)
    return summary


def _stages(cfg, ctx) -> dict:
    """Run or reuse each stage; {model: its summary entry}."""
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.config import commands as C
    from minitron_megatron.config.distill import ModelSource
    from minitron_megatron.distill.loop import distill
    from minitron_megatron.recipes import run_report
    from minitron_megatron.recipes import teacher as recipe_teacher
    from minitron_megatron.search.command import search
    from minitron_megatron.train.loop import pretrain

    root = Path(cfg.save)
    dirs = {name: root / name for name in ("teacher", "search", "student", "scratch", "ce")}
    teacher = str(dirs["teacher"])
    if recipe_teacher.imported(cfg):  # a pretrained model: import it, and measure it as `train` would have
        stages = {"teacher": _stage("teacher", dirs["teacher"],
                                    lambda: recipe_teacher.import_teacher(cfg, teacher, ctx), ctx)}
        stages["teacher"]["val_loss"] = recipe_teacher.teacher_val_loss(cfg, teacher, root, ctx)["val_loss"]
    else:
        stages = {"teacher": _stage("teacher", dirs["teacher"], lambda: pretrain(
            C.TrainCommand(**_common(cfg, save=teacher), train=cfg.train, evaluate=cfg.evaluate), ctx), ctx)}
    stages["search"] = _stage("search", dirs["search"], lambda: search(
        _search_command(cfg, teacher, str(dirs["search"])), ctx), ctx)
    for budget in cfg.extra_budgets:  # the same search at another size, on the main search's scores
        extra = run_report.extra_search_dir(root, budget)
        _share_scores(dirs["search"], extra, ctx)
        command = _search_command(cfg, teacher, str(extra))
        command = replace(command, search=replace(command.search, param_budget=budget))
        stages[f"search-{budget:g}"] = _stage(f"search {budget:g}", extra, lambda: search(command, ctx), ctx)
    found = rd.read_summary(dirs["search"])
    winner = dirs["search"] / found["best"]["pruned"]  # the winner's pruned weights
    winner_cfg = rd.read_model_yaml(winner)[0]
    stages["student"] = _stage("distill", dirs["student"], lambda: distill(
        C.DistillCommand(**_common(cfg, save=str(dirs["student"])), teacher=ModelSource(load=teacher),
                         student=ModelSource(load=str(winner)), distill=cfg.distill, evaluate=cfg.evaluate),
        ctx), ctx)
    stages["scratch"] = _stage("scratch", dirs["scratch"], lambda: pretrain(  # random init, winner's shape
        C.TrainCommand(**_common(cfg, model=winner_cfg, load=None, save=str(dirs["scratch"]),
                                 data=recipe_teacher.scratch_data(cfg, teacher)),
                       train=_loop(cfg.distill, cfg.scratch.optim), evaluate=cfg.evaluate), ctx), ctx)
    stages["ce"] = _stage("ce", dirs["ce"], lambda: pretrain(  # the winner's weights, CE, KD's schedule
        C.TrainCommand(**_common(cfg, load=str(winner), save=str(dirs["ce"])), train=_loop(cfg.distill),
                       evaluate=cfg.evaluate), ctx), ctx)
    models = run_report.models(stages, dirs, found, winner)
    if cfg.generate.prompts:
        from minitron_megatron.recipes import generate

        models["generations"] = generate.generate(cfg, generate.export_models(cfg, dirs, ctx), ctx)
    return models


def _share_scores(main: Path, extra: Path, ctx) -> None:
    """An extra budget's search starts with the main search's importance files (the same teacher
    and settings: its reuse check confirms it, else it scores again)."""
    import shutil

    from minitron_megatron.importance.io import META_FILE, SCORES_FILE, has_importance

    if ctx.is_main and has_importance(main) and not has_importance(extra):
        extra.mkdir(parents=True, exist_ok=True)
        for name in (SCORES_FILE, META_FILE):
            shutil.copyfile(main / name, extra / f".{name}.tmp")
        for name in (SCORES_FILE, META_FILE):  # META last: has_importance sees both or neither
            (extra / f".{name}.tmp").replace(extra / name)
    ctx.barrier()
