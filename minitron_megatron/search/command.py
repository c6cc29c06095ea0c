"""`search` (python -m minitron_megatron.search load=TEACHER search.param_budget=0.5 save=DIR).

Read top to bottom: check every setting and plan every round's candidates (nothing is
written before both pass) -> per round: importance once -> each candidate pruned, scored,
distilled, scored -> rank -> report. `search.candidate=i` stops after candidate i of the
(single) round; a later `search` without it collects, running what is missing.
"""

import json
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import List, Optional

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.resident import ResidentModels
from minitron_megatron.config.commands import DistillCommand, SearchCommand
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import DEPTH_METRICS, TrimTarget
from minitron_megatron.config.search import BUDGET_KINDS
from minitron_megatron.errors import ConfigError
from minitron_megatron.model.params import active_parameter_count, parameter_count
from minitron_megatron.runtime import clock
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.parallel_rules import model_parallel_problems
from minitron_megatron.search import report
from minitron_megatron.search.candidate import candidate_dir, check_arch, entry, run_candidate
from minitron_megatron.search.plan import Candidate, feasible_architectures, nearest_lines, plan_candidates, units
from minitron_megatron.search.rounds import Round, budget_problems, plan_rounds
from minitron_megatron.search.scores import depth_metrics, ensure_importance
from minitron_megatron.search.space import describe, space_problems
from minitron_megatron.train.driver import TrainingDiverged
from minitron_megatron.train.teardown import release_stage
from minitron_megatron.trim.stage import METHODS


@dataclass
class Teacher:
    path: str
    cfg: ModelConfig
    padded_vocab: int
    params: int
    active: int
    """Parameters used per token (== params for a dense model)."""

    def count(self, kind: str) -> int:
        """The teacher's count of `search.budget_kind`: what budgets are fractions of."""
        return self.active if kind == "active" else self.params


def setting_problems(cfg: SearchCommand, ctx: ParallelContext) -> List[str]:
    """Every problem of the settings alone (no teacher needed): `run` checks them before it
    trains the teacher."""
    from minitron_megatron.distill.setup import settings_problems

    s, problems = cfg.search, []
    if not cfg.save:
        problems.append("save is required: the search directory to write, e.g. save=runs/search")
    problems += space_problems(s.space, s.width_multiple)
    set_target = [f.name for f in fields(TrimTarget) if getattr(cfg.prune.target, f.name) is not None]
    if set_target:
        problems.append(f"the search sets prune.target per candidate; unset prune.target.{set_target[0]}"
                        + (f" (and {set_target[1:]})" if len(set_target) > 1 else ""))
    if cfg.prune.method not in METHODS:
        problems.append(f"prune.method={cfg.prune.method!r} is not one of {list(METHODS)}")
    if cfg.prune.depth_metric not in DEPTH_METRICS:
        problems.append(f"prune.depth_metric={cfg.prune.depth_metric!r} is not one of {list(DEPTH_METRICS)}")
    if cfg.teacher.load:
        problems.append("teacher.load: the search's teacher is load=; leave teacher.load unset "
                        "(teacher.precision and teacher.params_dtype still apply)")
    if cfg.prune.stage != "all" or cfg.prune.scores:
        problems.append("prune.stage and prune.scores are the search's own (it scores each round's start "
                        "model into save=); leave them unset")
    if cfg.parallel.pp_layout is not None:
        problems.append("parallel.pp_layout describes one model, but candidates differ in depth; leave it "
                        "unset (even pipeline split)")
    if s.candidate is not None and (s.rounds > 1 or len(s.round_budgets or []) > 1):
        problems.append("search.candidate=i needs a single round: each round starts from the previous "
                        "round's winner")
    if s.budget_kind not in BUDGET_KINDS:
        problems.append(f"search.budget_kind={s.budget_kind!r} is not one of {list(BUDGET_KINDS)}")
    if s.nearest < 0:
        problems.append(f"search.nearest={s.nearest} must be >= 0")
    if s.steps < 1:
        problems.append(f"search.steps={s.steps} must be >= 1")
    # distill's own setting checks (loop sizes, losses, evaluate.*), now rather than after the
    # first candidate is pruned. It is a private helper of distill/setup.py: a public
    # `settings_problems` there would be cleaner. DIR/candidates is never a finished run dir,
    # so its save= check passes; each student dir is checked (and resumed) by distill itself.
    d = DistillCommand(save=str(Path(cfg.save or ".") / "candidates"), teacher=cfg.teacher,
                       distill=replace(cfg.distill, steps=max(s.steps, 1)), evaluate=cfg.evaluate)
    problems += settings_problems(d, ctx)
    return problems


def _teacher(cfg: SearchCommand, ctx: ParallelContext) -> Teacher:
    rd.check_loadable(cfg.load)
    model_cfg, padded, _ = rd.read_model_yaml(cfg.load)
    model_cfg = rd.loaded_model_config(model_cfg, cfg.model, cfg.model_overrides, f"load={cfg.load}")
    rd.run_seq_length(cfg.seq_length, model_cfg, rd.recorded_seq_length(cfg.load), f"load={cfg.load}")
    problems = model_parallel_problems(model_cfg.resolved(), cfg.parallel, padded, subject=f"load={cfg.load}: model.")
    if problems:
        raise ConfigError(problems)
    return Teacher(str(cfg.load), model_cfg.resolved(), padded, parameter_count(model_cfg, padded),
                   active_parameter_count(model_cfg, padded))


def check_search(cfg: SearchCommand, ctx: ParallelContext):
    """(teacher, rounds, first round's candidates) or one ConfigError with every problem,
    before any data, model or file."""
    if not cfg.load:
        raise ConfigError("load is required: the teacher's run directory, e.g. load=runs/teacher")
    problems = setting_problems(cfg, ctx)
    try:
        teacher = _teacher(cfg, ctx)
    except ConfigError as err:
        raise ConfigError(problems + err.problems) from err
    s, tp, pp, ep = cfg.search, ctx.tp_size, ctx.pp_size, ctx.ep_size
    if s.budget_kind not in BUDGET_KINDS:
        raise ConfigError(problems)  # every count below depends on it
    base = teacher.count(s.budget_kind)
    budget = budget_problems(s, base, units(s.budget_kind))
    if budget and not space_problems(s.space, s.width_multiple):  # show what would fit instead
        feasible = feasible_architectures(teacher.cfg, teacher.cfg, s, teacher.padded_vocab, tp, pp, ep)
        budget += nearest_lines(feasible, base, base, s.nearest, tp, pp, s.budget_kind)
        raise ConfigError("\n".join(problems + budget))
    if problems:
        raise ConfigError(problems)
    rounds = plan_rounds(s, base, Path(cfg.save))
    # Later rounds start from a winner not known yet: their budgets are checked from the teacher.
    plans, errors = [], []
    for rnd in rounds:
        try:
            plans.append(plan_candidates(teacher.cfg, teacher.cfg, base, rnd.budget, s,
                                         teacher.padded_vocab, tp, pp, ep))
        except ConfigError as err:
            errors.append((f"round {rnd.number}: " if len(rounds) > 1 else "") + str(err))
    if errors:
        raise ConfigError("\n".join(errors))
    _check_depth_scores(cfg, teacher, plans)
    if s.candidate is not None and not 0 <= s.candidate < len(plans[0]):
        raise ConfigError(f"search.candidate={s.candidate} is not a candidate: there are {len(plans[0])} "
                          f"(0..{len(plans[0]) - 1})")
    for cand in plans[0]:
        check_arch(rounds[0].dir, cand)
    return teacher, rounds, plans[0]


def _check_depth_scores(cfg: SearchCommand, teacher: Teacher, plans: List[List[Candidate]]) -> None:
    """An explicit `prune.importance.depth_metrics` must hold the metric that ranks layers when a
    candidate has fewer layers (found now, not at that candidate's trim)."""
    metrics, metric = cfg.prune.importance.depth_metrics, cfg.prune.depth_metric
    cuts = any(c.arch["num_layers"] < teacher.cfg.num_layers for plan in plans for c in plan)
    if cuts and metrics is not None and cfg.prune.method == "importance" and metric not in metrics:
        raise ConfigError(f"prune.importance.depth_metrics={list(metrics)} lacks prune.depth_metric={metric}, "
                          "which ranks the layers of candidates with fewer layers; add it, or leave "
                          "depth_metrics unset (null: what the candidates need)")


def search(cfg: SearchCommand, ctx: ParallelContext) -> dict:
    """Search the architectures of `search.space` within the budget; returns the summary."""
    origin = time.time() - clock.elapsed()  # stages restart the clock for their own run dirs
    teacher, rounds, first = check_search(cfg, ctx)
    if cfg.search.list_candidates:
        entries = [entry(c, rounds[0].dir, teacher.params, teacher.active) for c in first]
        if ctx.is_main:
            print("\n".join(f"{e['index']}: {describe(e['arch'])}  {e['params']:,} parameters "
                            f"({e['params_fraction']:.3f})" + _active_text(e, teacher) + f"  {e['status']}"
                            for e in entries), flush=True)
        return {"candidates": entries, "budget": rounds[0].budget, "budget_kind": cfg.search.budget_kind,
                **_teacher_counts(teacher)}
    start, round_teacher, results = teacher.path, teacher.path, []
    resident = ResidentModels()  # the teacher (and each round's start), read once per search
    for rnd in rounds:
        candidates = first if rnd.number == 1 else _plan_later(cfg, ctx, teacher, rnd, start)
        resident.keep_only([start, round_teacher])
        result = run_round(cfg, ctx, teacher, rnd, candidates, start, round_teacher, resident)
        if cfg.search.candidate is not None:
            return result
        results.append(result)
        start = str(rnd.dir / result["best"]["student"])
        round_teacher = start if cfg.search.round_teacher == "previous" else teacher.path
    summary = results[0] if len(rounds) == 1 else _rounds_summary(cfg, rounds, results)
    summary = {**summary, "seconds": round(time.time() - origin, 1)}
    if ctx.is_main:
        if len(rounds) > 1:
            report.write_rounds_outputs(Path(cfg.save), summary)
        rd.write_summary(cfg.save, summary)  # the commit point: the search dir is complete
    ctx.barrier()
    return summary


def _plan_later(cfg: SearchCommand, ctx: ParallelContext, teacher: Teacher, rnd: Round, start: str):
    start_cfg, _, _ = rd.read_model_yaml(start)
    candidates = plan_candidates(start_cfg, teacher.cfg, teacher.count(cfg.search.budget_kind), rnd.budget,
                                 cfg.search, teacher.padded_vocab, ctx.tp_size, ctx.pp_size, ctx.ep_size)
    for cand in candidates:
        check_arch(rnd.dir, cand)
    return candidates


def run_round(cfg: SearchCommand, ctx: ParallelContext, teacher: Teacher, rnd: Round,
              candidates: List[Candidate], start: str, round_teacher: str,
              resident: Optional[ResidentModels] = None) -> dict:
    """Importance once, every (or the selected) candidate, then rank and report the round.

    A candidate whose distillation diverged is reported as failed and the others ranked; a
    round where every candidate failed ends the search (exit 3, as a diverged `distill`)."""
    s = cfg.search
    selected = candidates if s.candidate is None else [candidates[s.candidate]]
    # Scores are needed only to trim: a candidate already pruned (its student unfinished) is not.
    to_prune = [c for c in selected if not c.skipped and not any(
        rd.is_complete(candidate_dir(rnd.dir, c.index) / kind) for kind in ("pruned", "student"))]
    if to_prune and cfg.prune.method == "importance":
        start_layers = rd.read_model_yaml(start)[0].num_layers
        cuts = any(c.arch["num_layers"] < start_layers for c in candidates if not c.skipped)
        ensure_importance(cfg, ctx, rnd.dir, start, depth_metrics(cfg, cuts), resident)
        release_stage()
    for cand in selected:
        run_candidate(cfg, ctx, cand, rnd.dir, start, round_teacher, resident)
    entries = [entry(c, rnd.dir, teacher.params, teacher.active) for c in candidates]
    if s.candidate is not None:
        return {"candidate": entries[s.candidate], "candidates": len(entries)}
    report.rank(entries)
    failed = [e for e in entries if e["status"].startswith("failed")]
    if failed and not any(e["status"] == "done" for e in entries):
        if ctx.is_main:
            rd.atomic_write_text(rnd.dir / report.CANDIDATES_JSON, json.dumps(entries, indent=2) + "\n")
        ctx.barrier()
        raise EveryCandidateFailed(rnd.number, failed)
    meta = {"teacher": round_teacher, **_teacher_counts(teacher), "start": start, "budget": rnd.budget,
            "budget_kind": s.budget_kind, "tolerance": s.tolerance, "steps": s.steps,
            "eval_samples": cfg.evaluate.samples, "title": f" - round {rnd.number}" if rnd.dir != Path(cfg.save) else ""}
    summary = {"best": report.best(entries), "candidates": entries, "budget": rnd.budget,
               "budget_kind": s.budget_kind, **_teacher_counts(teacher), "steps": s.steps}
    if ctx.is_main:
        report.write_outputs(rnd.dir, entries, meta)
        if rnd.dir != Path(cfg.save):  # a round of several: the search's own summary comes last
            rd.write_summary(rnd.dir, summary)
    ctx.barrier()
    return summary


def _teacher_counts(teacher: Teacher) -> dict:
    """teacher_params, and teacher_active_params for a mixture of experts (a dense model's
    summaries stay as they were: its active count is its total)."""
    return {"teacher_params": teacher.params,
            **({"teacher_active_params": teacher.active} if teacher.cfg.is_moe else {})}


def _active_text(e: dict, teacher: Teacher) -> str:
    if not teacher.cfg.is_moe:
        return ""
    return f", {e['active_params']:,} active ({e['active_params'] / teacher.active:.3f})"


class EveryCandidateFailed(TrainingDiverged):
    """No candidate of a round finished its distillation: nothing to rank (exit 3)."""

    def __init__(self, round_number: int, failed: List[dict]):
        RuntimeError.__init__(
            self, f"search round {round_number}: every candidate's distillation diverged ("
            + "; ".join(f"#{e['index']} {e['status'][len('failed: '):]}" for e in failed)
            + "); lower distill.optim.lr (or raise distill.optim.warmup_steps), delete the candidates' "
            "failed.json and rerun with the same save=")
        self.step, self.component, self.value, self.last_checkpoint = None, "every candidate", None, None


def _rounds_summary(cfg: SearchCommand, rounds: List[Round], results: List[dict]) -> dict:
    """The last round's result with paths relative to the search dir, plus one line per round."""
    save = Path(cfg.save)

    def rebased(e: dict, rnd: Round) -> dict:
        prefix = rnd.dir.relative_to(save)
        return {**e, "round": rnd.number, "pruned": str(prefix / e["pruned"]), "student": str(prefix / e["student"])}

    last = rounds[-1]
    return {"best": rebased(results[-1]["best"], last),
            "candidates": [rebased(e, last) for e in results[-1]["candidates"]],
            "rounds": [{"round": r.number, "budget": r.budget, "best": rebased(res["best"], r)}
                       for r, res in zip(rounds, results)],
            "budget": last.budget, "budget_kind": cfg.search.budget_kind,
            **{k: v for k, v in results[-1].items() if k.startswith("teacher_")}, "steps": cfg.search.steps}
