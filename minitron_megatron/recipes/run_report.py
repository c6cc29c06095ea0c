"""The `run` recipe's outputs: the per-model summary, the stdout table, report.md and its plots.

Everything is read back from the stage run dirs (summary.json, train_log.jsonl,
importance.*), so a rerun that reuses every stage writes the same report. Files are
written atomically (rank 0).
"""

import json
from pathlib import Path
from typing import Dict, List

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.search.space import describe

REPORT_MD = "report.md"
CURVES_PNG = "loss_curves.png"
RANKING_PNG = "search_ranking.png"
BASELINES = ("student", "scratch", "ce")
WHAT = {"teacher": "teacher", "pruned": "search winner, pruned (zero-shot)",
        "search": "search winner after the search's KD steps", "student": "winner distilled (KD)",
        "scratch": "winner's architecture from random init (CE)", "ce": "winner's pruned weights retrained (CE)"}


def models(stages: Dict[str, dict], dirs: Dict[str, Path], found: dict, winner: Path) -> Dict[str, dict]:
    """{model: {val_loss, params, seconds, reused, ...}} in the table's order. `pruned` and `search`
    are the search's winner (before and after its short distillation); their time is the search's."""
    best, search = found["best"], stages["search"]
    out = {"teacher": _trained(stages["teacher"], dirs["teacher"])}
    pruned = rd.read_summary(winner)
    out["pruned"] = {"val_loss": pruned["val_loss"], "params": pruned["params_after"], "seconds": 0.0,
                     "reused": search["reused"], "arch": describe(best["arch"])}
    out["search"] = {"val_loss": best["val_loss"], "params": best["params"], **search,
                     "arch": describe(best["arch"]), "candidates": len(found["candidates"]),
                     "steps": found["steps"]}
    for name in BASELINES:
        out[name] = _trained(stages[name], dirs[name])
    return out


def extra_search_dir(root: Path, budget: float) -> Path:
    """The run dir of the recipe's search at one of `extra_budgets`."""
    return Path(root) / f"search-{budget:g}"


def extra_searches(root: Path, budgets: List[float]) -> Dict[str, dict]:
    """{search dir name: its summary} of the recipe's `extra_budgets` searches, largest first."""
    found = {extra_search_dir(root, b).name: rd.read_summary(extra_search_dir(root, b)) for b in budgets}
    return dict(sorted(found.items(), key=lambda item: -item[1]["budget"]))


def _trained(stage: dict, run_dir: Path) -> dict:
    """A trained (or imported: its val_loss is the stage's, measured by `evaluate`) model's entry."""
    s = rd.read_summary(run_dir)
    return {"val_loss": s.get("val_loss"), "params": s["params"], "tokens": s.get("tokens_seen"), **stage}


def table(models: Dict[str, dict]) -> str:
    rows = ["| model | what | val loss | params | tokens | stage seconds |", "|---|---|---|---|---|---|"]
    for name, m in models.items():
        if name not in WHAT:  # generations
            continue
        seconds = "reused" if m["reused"] else ("(search)" if name == "pruned" else f"{m['seconds']:.0f}")
        tokens = f"{m['tokens']:,}" if m.get("tokens") else "-"
        rows.append(f"| {name} | {WHAT[name]} | {m['val_loss']:.4f} | {m['params']:,} | {tokens} | {seconds} |")
    return "\n".join(rows)


def claims(models: Dict[str, dict]) -> List[dict]:
    """The comparisons the recipe makes, each with both numbers, the margin and a verdict."""
    kd = models["student"]["val_loss"]
    out = []
    for other, text in (("scratch", "KD student < same architecture from scratch, same tokens"),
                        ("ce", "KD student < CE retraining of the same pruned weights, same tokens")):
        value = models[other]["val_loss"]
        out.append({"claim": text, "kd": kd, "other": value, "margin": value - kd, "holds": kd < value})
    return out


def eval_curve(run_dir: Path) -> Dict[int, float]:
    """{tokens: val_loss} of a run's periodic evaluations (train_log.jsonl; the last line per
    step wins, as after a resume)."""
    summary, path = rd.read_summary(run_dir), Path(run_dir) / "train_log.jsonl"
    per_step = summary["tokens_seen"] // summary["steps"]
    curve = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.get("kind") == "eval":
            curve[record["step"] * per_step] = record["val_loss"]
    return dict(sorted(curve.items()))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: Path) -> None:
    try:
        rd.atomic_save_figure(fig, path)
    finally:
        _pyplot().close(fig)


def save_curves(root: Path, models: Dict[str, dict]) -> Path:
    """Validation loss vs tokens of KD, from-scratch and CE retraining, with the teacher's loss
    and the pruned model's zero-shot loss (where KD and CE start) for reference."""
    fig, ax = _pyplot().subplots(figsize=(8, 4.5))
    for name, label in (("student", "KD (from pruned)"), ("ce", "CE (from pruned)"), ("scratch", "from scratch")):
        curve = eval_curve(root / name)
        ax.plot(list(curve), list(curve.values()), marker=".", label=f"{label}: {models[name]['val_loss']:.3f}")
    ax.axhline(models["teacher"]["val_loss"], color="gray", linestyle="--",
               label=f"teacher: {models['teacher']['val_loss']:.3f}")
    ax.scatter([0], [models["pruned"]["val_loss"]], color="black", zorder=3,
               label=f"pruned, zero-shot: {models['pruned']['val_loss']:.3f}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("retraining the winner's architecture (legend: final loss on evaluate.samples)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, root / CURVES_PNG)
    return root / CURVES_PNG


def save_ranking(root: Path, found: dict) -> Path:
    """Each candidate's zero-shot loss against its loss after the search's KD steps."""
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    done = [e for e in found["candidates"] if e["status"] == "done"]
    for e in done:  # the point says which candidate; the legend says what it is
        ax.scatter(e["zero_shot_loss"], e["val_loss"], s=40, color="tab:red" if e["rank"] == 1 else "tab:blue",
                   label=f"#{e['index']} {describe(e['arch'])}: rank {e['rank_zero_shot']} zero-shot, "
                         f"{e['rank']} after")
        ax.annotate(f"#{e['index']}", (e["zero_shot_loss"], e["val_loss"]), textcoords="offset points",
                    xytext=(5, 3))
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("zero-shot loss (pruned)")
    ax.set_ylabel(f"loss after {found['steps']} KD steps")
    ax.set_title("search: zero-shot vs retrained ranking (red: winner)")
    ax.margins(0.25, 0.6)  # room for the legend above the points
    fig.tight_layout()
    _savefig(fig, root / RANKING_PNG)
    return root / RANKING_PNG


def save_importance(root: Path, search_dir: Path) -> List[Path]:
    """The importance package's own heat maps of the search's one importance run."""
    from minitron_megatron.importance.io import load_importance
    from minitron_megatron.importance.report import save_plots

    scores, meta = load_importance(search_dir)
    return save_plots(scores, meta, root)


def candidate_table(found: dict) -> List[str]:
    lines = [f"| # | architecture | params (of teacher) | zero-shot loss (rank) | loss after {found['steps']} KD "
             "steps (rank) |", "|---|---|---|---|---|"]
    for e in found["candidates"]:
        if e["status"] == "done":
            lines.append(f"| {e['index']} | {describe(e['arch'])} | {e['params']:,} ({e['params_fraction']:.3f}) | "
                         f"{e['zero_shot_loss']:.4f} ({e['rank_zero_shot']}) | {e['val_loss']:.4f} ({e['rank']}) |")
    return lines


def write_report(root: Path, models: Dict[str, dict], found: dict, cfg) -> Path:
    """The plots, then report.md (the table, the claims with margins, the search's ranking)."""
    from minitron_megatron.recipes.generate import markdown

    root = Path(root)
    images = [save_curves(root, models), *save_importance(root, root / "search"), save_ranking(root, found)]
    source = cfg.teacher.from_gguf or cfg.teacher.from_hf
    teacher = (f"Teacher imported from `{source}`" if source else
               f"Teacher `{cfg.model.name}` trained {cfg.train.steps} steps")
    lines = ["# Minitron recipe", "",
             f"{teacher}; search over "
             f"{len(found['candidates'])} architectures within {cfg.search.tolerance:.0%} of "
             f"{found['budget']:,} parameters, {found['steps']} KD steps each (`search/report.md`); the winner "
             f"({models['search']['arch']}) distilled {cfg.distill.steps} steps, and the two baselines trained on "
             f"the same tokens. Every loss: `evaluate` on {cfg.evaluate.samples} validation samples; seed "
             f"{cfg.seed}.", "", table(models), "", "## Claims", ""]
    for c in claims(models):
        lines.append(f"- {c['claim']}: {c['kd']:.4f} vs {c['other']:.4f} (margin {c['margin']:+.4f}): "
                     f"**{'holds' if c['holds'] else 'does not hold'}**")
    gap = models["student"]["val_loss"] / models["teacher"]["val_loss"] - 1
    lines += [f"- student vs teacher: {gap:+.1%} val loss", ""]
    searches = {"search": found, **extra_searches(root, cfg.extra_budgets)}
    for name, summary in searches.items():
        lines += [f"## Search at {summary['budget']:,} parameters (`{name}/`): zero-shot vs retrained ranking", ""]
        lines += candidate_table(summary) + [""]
    if "generations" in models:
        lines += markdown(models["generations"])
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    rd.atomic_write_text(root / REPORT_MD, "\n".join(lines))
    return root / REPORT_MD
