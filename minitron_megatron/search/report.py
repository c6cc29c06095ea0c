"""A round's outputs: ranks, candidates.json, report.md, kd_curves.png (summary.json, the commit
point, is written last by the command).

Every file is written atomically.
Nothing here depends on wall time, so one search and a set of per-candidate jobs plus a
collecting search write the same candidates.json and report.md.
"""

import json
import math
from pathlib import Path
from typing import Dict, List

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.search.space import describe

CANDIDATES_JSON = "candidates.json"
REPORT_MD = "report.md"
CURVES_PNG = "kd_curves.png"


def rank(entries: List[dict]) -> List[dict]:
    """Adds `rank` (by val_loss after distillation) and `rank_zero_shot` (by the pruned model's
    loss) to the done entries, 1 = best; ties go to the lower index."""
    for key, field in (("rank", "val_loss"), ("rank_zero_shot", "zero_shot_loss")):
        done = sorted((e for e in entries if e["status"] == "done"), key=lambda e: (_finite(e[field]), e["index"]))
        for position, e in enumerate(done, start=1):
            e[key] = position
        for e in entries:
            e.setdefault(key, None)
    return entries


def _finite(loss) -> float:
    """A NaN/Inf loss (a zero-shot evaluation that overflowed) ranks last, not anywhere."""
    return loss if loss is not None and math.isfinite(loss) else math.inf


def best(entries: List[dict]) -> dict:
    return next(e for e in entries if e.get("rank") == 1)


def kd_curve(student_dir: Path) -> Dict[int, float]:
    """{step: training KD loss} from a student's train_log.jsonl (the last line per step wins:
    a resumed run rewrites the steps after its checkpoint)."""
    path = Path(student_dir) / "train_log.jsonl"
    curve = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.get("kind") == "step" and "kd_loss" in record:
            curve[record["step"]] = record["kd_loss"]
    return curve


def save_curves(round_dir: Path, entries: List[dict]) -> Path:
    """One KD-loss-per-step line per done candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for e in entries:
        if e["status"] == "done":
            curve = kd_curve(round_dir / e["student"])
            ax.plot(list(curve), list(curve.values()), marker=".", label=f"#{e['index']} {describe(e['arch'])}")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("KD loss (train)")
    ax.set_title("candidates' KD loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(round_dir) / CURVES_PNG
    try:
        rd.atomic_save_figure(fig, path)
    finally:
        plt.close(fig)
    return path


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown(entries: List[dict], meta: dict) -> str:
    """report.md: the search settings and one table row per candidate (a mixture-of-experts
    teacher's also shows the active parameters per token, whichever count the budget used)."""
    moe = "teacher_active_params" in meta
    active = meta.get("budget_kind") == "active"
    base = meta["teacher_active_params"] if active else meta["teacher_params"]
    teacher = f"{meta['teacher_params']:,} parameters" + (
        f", {meta['teacher_active_params']:,} active per token" if moe else "")
    lines = [f"# Architecture search{meta.get('title', '')}", "",
             f"Teacher `{meta['teacher']}` ({teacher}), pruned from `{meta['start']}`; budget {meta['budget']:,} "
             f"{'active ' if active else ''}parameters ({meta['budget'] / base:.3f} of the teacher) +- "
             f"{meta['tolerance']:.0%}; {meta['steps']} distillation steps per candidate; "
             f"losses on {meta['eval_samples']} validation samples.", "",
             f"| # | architecture | parameters | fraction |{' active | fraction |' if moe else ''} zero-shot loss | "
             f"rank (zero-shot) | loss after {meta['steps']} steps | rank | status |",
             "|---|---|---|---|" + ("---|---|" if moe else "") + "---|---|---|---|---|"]
    for e in entries:
        counts = f"{e['params']:,} | {e['params_fraction']:.3f} |" + (
            f" {e['active_params']:,} | {e['active_fraction']:.3f} |" if moe else "")
        lines.append(f"| {e['index']} | {describe(e['arch'])} | {counts} "
                     f"{_loss(e['zero_shot_loss'])} | {e['rank_zero_shot'] or '-'} | {_loss(e['val_loss'])} | "
                     f"{e['rank'] or '-'} | {e['status']} |")
    winner = best(entries)
    lines += ["", f"**Best:** #{winner['index']} {describe(winner['arch'])}, {winner['params']:,} parameters"
                  + (f" ({winner['active_params']:,} active)" if moe else "") + ", "
                  f"val loss {winner['val_loss']:.4f} after {meta['steps']} steps "
                  f"(`{winner['student']}`).", "", f"![KD loss per step]({CURVES_PNG})", ""]
    return "\n".join(lines)


def write_outputs(round_dir: Path, entries: List[dict], meta: dict) -> None:
    """candidates.json, the plot and report.md of one round (rank 0; summary.json is the caller's)."""
    round_dir = Path(round_dir)
    rd.atomic_write_text(round_dir / CANDIDATES_JSON, json.dumps(entries, indent=2) + "\n")
    save_curves(round_dir, entries)
    rd.atomic_write_text(round_dir / REPORT_MD, markdown(entries, meta))


def write_rounds_outputs(save: Path, summary: dict) -> None:
    """The iterative search's own candidates.json (the last round's) and report.md (one row per
    round, linking each round's report)."""
    save = Path(save)
    rd.atomic_write_text(save / CANDIDATES_JSON, json.dumps(summary["candidates"], indent=2) + "\n")
    lines = [f"# Iterative architecture search ({len(summary['rounds'])} rounds)", "",
             f"Teacher: {summary['teacher_params']:,} parameters; {summary['steps']} distillation steps per "
             "candidate.", "", "| round | budget | best architecture | parameters | loss after distillation | report |",
             "|---|---|---|---|---|---|"]
    for r in summary["rounds"]:
        b = r["best"]
        lines.append(f"| {r['round']} | {r['budget']:,} | {describe(b['arch'])} | {b['params']:,} | "
                     f"{_loss(b['val_loss'])} | [rounds/{r['round']}/{REPORT_MD}](rounds/{r['round']}/{REPORT_MD}) |")
    final = summary["best"]
    lines += ["", f"**Result:** {describe(final['arch'])}, {final['params']:,} parameters, val loss "
                  f"{final['val_loss']:.4f} (`{final['student']}`).", ""]
    rd.atomic_write_text(save / REPORT_MD, "\n".join(lines))
