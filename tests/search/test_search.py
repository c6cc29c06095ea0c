"""`python -m minitron_megatron.search` end to end on the tiny teacher, and its planning rules.

The space below has four architectures of the teacher (layers 4 -> {4, 3}, heads 4 -> {4, 2},
hidden 64 -> 48, MLP expansion 3 -> 2 so ffn 192 -> 96); a budget of 0.65 +- 2% keeps exactly two of them, one of
which cuts a layer, so the shared scores must serve both width and depth trims.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.search import SearchConfig, SearchSpace
from minitron_megatron.model.params import parameter_count
from minitron_megatron.runtime.faults import FAULT_EXIT
from minitron_megatron.search.plan import plan_candidates
from minitron_megatron.search.rounds import round_budgets
from tests.commands import run_command, summary

pytestmark = pytest.mark.slow  # minutes: run first (tests/conftest.py)

SPACE = ["search.space.num_layers=[1.0,0.75]", "search.space.num_attention_heads=[1.0,0.5]",
         "search.space.num_query_groups=[1.0]", "search.space.ffn_ratio=[0.666667]",
         "search.space.hidden_size=[0.75]"]
SEARCH = [
    "device=cpu", "evaluate.samples=16", "evaluate.micro_batch_size=4",
    "prune.importance.calibration_samples=16", "prune.importance.micro_batch_size=4",
    "prune.importance.depth_samples=16",
    "distill.micro_batch_size=4", "distill.global_batch_size=8", "distill.eval_samples=16",
    "distill.log_interval=1", "distill.optim.warmup_steps=1", "search.steps=2",
]
BUDGET = ["search.param_budget=0.65", "search.tolerance=0.02"]
# (num_layers, hidden, ffn, heads, groups) within 0.65 +- 2% of the teacher, by hand.
EXPECTED = {(4, 48, 96, 2, 2), (3, 48, 96, 4, 2)}
AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def search(teacher, save, *overrides, space=SPACE, budget=BUDGET, **kw):
    """`search` with the test's settings; `space` and `budget` overrides replace the defaults
    above (Hydra takes one value per key)."""
    return run_command("search", f"load={teacher}", *SEARCH, *space, *budget, *overrides, f"save={save}", **kw)


@pytest.fixture(scope="module")
def one_search(teacher, tmp_path_factory):
    """One uninterrupted search: the reference the other ways of running it must reproduce."""
    save = tmp_path_factory.mktemp("one") / "search"
    return save, summary(search(teacher, save))


def teacher_model(teacher):
    cfg, padded, _ = rd.read_model_yaml(teacher)
    return cfg, padded


def summary_mtimes(save: Path) -> dict:
    return {str(p.relative_to(save)): p.stat().st_mtime_ns for p in save.glob("candidates/*/*/summary.json")}


def comparable(save: Path) -> list:
    return json.loads((save / "candidates.json").read_text())


def test_plan_skips_what_tp_cannot_split_and_counts_exactly(teacher):
    """Catches a candidate list that depends on TP (indices would differ between jobs), a TP
    failure that drops a candidate silently, and a budget filter on anything but exact counts."""
    cfg, padded = teacher_model(teacher)
    total = parameter_count(cfg, padded)
    space = SearchSpace(num_layers=[1.0], num_attention_heads=[0.5], num_query_groups=[1.0, 0.5],
                        ffn_ratio=[0.666667], hidden_size=[0.75])
    s = SearchConfig(space=space, tolerance=0.2)
    one = plan_candidates(cfg, cfg, total, int(0.65 * total), s, padded, 1, 1)
    two = plan_candidates(cfg, cfg, total, int(0.65 * total), s, padded, 2, 1)
    assert [c.arch for c in one] == [c.arch for c in two] and len(one) == 2
    assert [c.skipped for c in one] == [None, None]
    skipped = {c.arch["num_query_groups"]: c.skipped for c in two}
    assert skipped[2] is None and "parallel.tp=2 does not divide the pruned num_query_groups=1" in skipped[1]
    for c in one:
        assert c.params == parameter_count(replace(cfg, **c.arch), padded)


def test_default_space_on_nemotron_15b_holds_minitron_8b_and_4b():
    """The defaults are the paper's Table 9: on its teacher, the budget filter at each published
    model's exact size keeps that model (catches a space or an expansion axis off the paper's)."""
    conf = Path(__file__).resolve().parents[2] / "conf" / "model"
    load = lambda name: ModelConfig(**yaml.safe_load((conf / f"{name}.yaml").read_text())).resolved()  # noqa: E731
    teacher = load("nemotron4-15b")
    total = parameter_count(teacher, 256000)
    for name in ("minitron-8b", "minitron-4b"):
        student = load(name)
        arch = {a: getattr(student, a) for a in AXES}
        found = plan_candidates(teacher, teacher, total, parameter_count(student, 256000), SearchConfig(), 256000, 8, 1)
        assert arch in [c.arch for c in found] and all(c.skipped is None for c in found), name


def test_round_budgets_shrink_geometrically():
    s = SearchConfig(param_budget=0.25, rounds=2)
    assert round_budgets(s, 1000) == [500, 250]
    assert round_budgets(replace(s, round_budgets=[0.8, 300]), 1000) == [800, 300]


def test_search_lists_every_candidate_within_budget_and_ranks_by_loss(teacher, one_search):
    """Catches approximate parameter counts, candidates outside the tolerance (or missing ones),
    a ranking that does not follow the measured losses, and losses that are not the run dirs'."""
    save, out = one_search
    cfg, padded = teacher_model(teacher)
    budget = 0.65 * parameter_count(cfg, padded)
    found = {tuple(e["arch"][a] for a in AXES) for e in out["candidates"]}
    assert found == EXPECTED
    for e in out["candidates"]:
        exact = parameter_count(replace(cfg, **e["arch"]), padded)
        assert e["params"] == exact and abs(exact - budget) <= 0.02 * budget
        pruned, student = rd.read_summary(save / e["pruned"]), rd.read_summary(save / e["student"])
        assert pruned["params_after"] == exact and student["params"] == exact
        assert e["zero_shot_loss"] == pruned["val_loss"] and e["val_loss"] == student["val_loss"]
        assert e["status"] == "done" and student["steps"] == 2
    by_loss = sorted(out["candidates"], key=lambda e: e["val_loss"])
    assert [e["rank"] for e in by_loss] == [1, 2] and out["best"] == by_loss[0]
    by_zero_shot = sorted(out["candidates"], key=lambda e: e["zero_shot_loss"])
    assert [e["rank_zero_shot"] for e in by_zero_shot] == [1, 2]
    assert comparable(save) == out["candidates"] and rd.read_summary(save) == out
    assert (save / "kd_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (save / "report.md").read_text()
    assert all(f"{e['params']:,}" in report and f"{e['val_loss']:.4f}" in report for e in out["candidates"])
    scores = json.loads((save / "importance.json").read_text())["scores"]
    assert "depth.block_importance" in scores and "depth.loss_drop" not in scores  # only what trims need


def test_candidate_jobs_then_collect_equal_one_search(teacher, one_search, tmp_path_factory):
    """Catches jobs that disagree on the candidate list, a collector that redoes finished
    candidates, and results that depend on how the work was spread over processes."""
    one = one_search[0]
    save = tmp_path_factory.mktemp("jobs") / "search"
    for i in (1, 0):
        job = summary(search(teacher, save, f"search.candidate={i}"))
        assert job["candidate"]["index"] == i and job["candidate"]["status"] == "done" and job["candidates"] == 2
    assert not rd.is_complete(save)  # a job only evaluates its candidate
    before = summary_mtimes(save)
    out = summary(search(teacher, save))
    assert summary_mtimes(save) == before and len(before) == 4
    assert comparable(save) == comparable(one) == out["candidates"]
    assert (save / "report.md").read_text() == (one / "report.md").read_text()


def test_interrupted_search_resumes_without_redoing_finished_work(teacher, one_search, tmp_path_factory):
    """Catches a resume that redoes a finished pruned model, that cannot finish a student whose
    last checkpoint was written but not its summary, or that looks complete after a crash."""
    save = tmp_path_factory.mktemp("fault") / "search"
    # The 2nd summary write of the process is candidate 0's student: it dies there.
    crashed = search(teacher, save, check=False, env={"MINITRON_FAULT": "summary.write:2"})
    assert crashed.returncode == FAULT_EXIT, crashed.stderr[-2000:]
    assert rd.is_complete(save / "candidates/0/pruned") and not rd.is_complete(save / "candidates/0/student")
    assert not rd.is_complete(save)
    pruned_mtime = (save / "candidates/0/pruned/summary.json").stat().st_mtime_ns
    resumed = search(teacher, save)
    assert "resuming" in resumed.stdout  # the driver picked up the student's checkpoint
    assert (save / "candidates/0/pruned/summary.json").stat().st_mtime_ns == pruned_mtime
    out = summary(resumed)
    assert all(e["status"] == "done" for e in out["candidates"])
    assert comparable(save) == comparable(one_search[0]) == out["candidates"]  # as if never interrupted


def test_list_candidates_writes_nothing(teacher, tmp_path):
    """Catches a listing that differs from what the jobs evaluate, or one that starts work."""
    out = summary(search(teacher, tmp_path / "out", "search.list_candidates=true"))
    assert [(e["index"], tuple(e["arch"][a] for a in AXES)) for e in out["candidates"]] == \
        [(0, (4, 48, 96, 2, 2)), (1, (3, 48, 96, 4, 2))]  # largest first: the jobs' indices
    assert {e["status"] for e in out["candidates"]} == {"pending"} and not (tmp_path / "out").exists()


def test_bad_inputs_exit_2_with_nearest_architectures_and_write_nothing(teacher, tmp_path):
    cfg, padded = teacher_model(teacher)
    total = parameter_count(cfg, padded)
    size = parameter_count(replace(cfg, hidden_size=48, ffn_hidden_size=96, num_attention_heads=2), padded)
    nearest = f"layers=4 hidden=48 ffn=96 heads=2 groups=2: {size:,} parameters"
    cases = {
        "empty": (["search.tolerance=0.001", "search.param_budget=0.5"], "no architecture of search.space is within"),
        "too_big": ([f"search.param_budget={total + 1000}", "search.tolerance=0.02"], f"above the teacher's {total:,}"),
    }
    for name, (budget, message) in cases.items():
        proc = search(teacher, tmp_path / name, budget=budget, check=False)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert message in proc.stderr and "nearest feasible architectures" in proc.stderr, proc.stderr
        assert nearest in proc.stderr, proc.stderr
        assert not (tmp_path / name).exists()
    # A distillation setting fails before the first candidate is pruned, not after.
    proc = search(teacher, tmp_path / "kd", "distill.logit_loss=bogus", "prune.target.hidden_size=32",
                  "prune.depth_metric=perplexity", check=False)
    assert proc.returncode == 2 and "distill.logit_loss='bogus'" in proc.stderr, proc.stderr[-2000:]
    assert "unset prune.target.hidden_size" in proc.stderr and "prune.depth_metric='perplexity'" in proc.stderr
    assert not (tmp_path / "kd").exists()
    # Candidate 1 cuts a layer: scores without the metric that ranks layers cannot trim it.
    proc = search(teacher, tmp_path / "depth", "prune.importance.depth_metrics=[loss_drop]", check=False)
    assert proc.returncode == 2 and "lacks prune.depth_metric=block_importance" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "depth").exists()


def test_space_that_tp_cannot_split_fails_before_work(teacher, tmp_path):
    """Catches a TP failure found only after importance has run (or written anything)."""
    cfg, padded = teacher_model(teacher)
    one_group = parameter_count(replace(cfg, hidden_size=48, ffn_hidden_size=96, num_attention_heads=2,
                                        num_query_groups=1), padded)
    total = parameter_count(cfg, padded)
    space = ["search.space.num_layers=[1.0]", "search.space.num_attention_heads=[0.5]",
             "search.space.num_query_groups=[1.0,0.5]", "search.space.ffn_ratio=[0.666667]",
             "search.space.hidden_size=[0.75]"]
    proc = search(teacher, tmp_path / "out", "parallel.tp=2", space=space,
                  budget=[f"search.param_budget={one_group}", "search.tolerance=0.001"], nproc=2, check=False)
    # torchrun exits 1 when a worker fails; the workers' own status is in its report.
    assert proc.returncode != 0 and "exitcode  : 2 " in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("error: search:") == 1  # rank 0 reports, once
    assert "cannot split any of the 1 candidates" in proc.stderr and "num_query_groups=1" in proc.stderr
    two_groups = parameter_count(replace(cfg, hidden_size=48, ffn_hidden_size=96, num_attention_heads=2), padded)
    assert f"layers=4 hidden=48 ffn=96 heads=2 groups=2: {two_groups:,} parameters ({two_groups / total:.3f})" \
        in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_tp2_search_reports_what_it_cannot_split_and_matches_tp1(teacher, one_search, tmp_path):
    """Catches a TP failure that crashes the search (or drops the candidate silently), and
    candidates pruned or distilled differently at TP=2 than at TP=1."""
    space = ["search.space.num_layers=[1.0]", "search.space.num_attention_heads=[0.5]",
             "search.space.num_query_groups=[1.0,0.5]", "search.space.ffn_ratio=[0.666667]",
             "search.space.hidden_size=[0.75]"]
    save = tmp_path / "tp2"
    out = summary(search(teacher, save, "parallel.tp=2", space=space,
                         budget=["search.param_budget=0.65", "search.tolerance=0.2"], nproc=2))
    by_groups = {e["arch"]["num_query_groups"]: e for e in out["candidates"]}
    assert by_groups[1]["status"] == "skipped: parallel.tp=2 does not divide the pruned num_query_groups=1"
    assert by_groups[1]["val_loss"] is None and by_groups[1]["rank"] is None
    assert not (save / by_groups[1]["student"]).exists()
    assert by_groups[1]["status"] in (save / "report.md").read_text()
    tp1 = next(e for e in one_search[1]["candidates"] if e["arch"] == by_groups[2]["arch"])
    assert out["best"]["arch"] == tp1["arch"] and by_groups[2]["status"] == "done"
    for key in ("zero_shot_loss", "val_loss"):
        assert math.isclose(by_groups[2][key], tp1[key], rel_tol=1e-4), (key, by_groups[2], tp1)


def test_two_rounds_reach_the_target_from_the_previous_student(teacher, tmp_path):
    """Catches a round that starts from the teacher instead of the previous winner, and a final
    model that is not the target size."""
    save = tmp_path / "rounds"
    space = ["search.space.num_layers=[1.0]", "search.space.num_attention_heads=[1.0]",
             "search.space.num_query_groups=[1.0]", "search.space.ffn_ratio=[0.666667]",
             "search.space.hidden_size=[1.0,0.75]"]
    out = summary(search(teacher, save, "search.round_teacher=previous", space=space,
                         budget=["search.round_budgets=[0.93,0.67]", "search.tolerance=0.01"]))
    cfg, padded = teacher_model(teacher)
    assert [r["best"]["arch"]["hidden_size"] for r in out["rounds"]] == [64, 48]
    final = save / out["best"]["student"]
    final_cfg, _, _ = rd.read_model_yaml(final)
    assert (final_cfg.hidden_size, final_cfg.ffn_hidden_size) == (48, 96)
    target = 0.67 * parameter_count(cfg, padded)
    assert out["best"]["params"] == parameter_count(final_cfg, padded)
    assert abs(out["best"]["params"] - target) <= 0.01 * target
    round2 = json.loads((save / "rounds/2/importance.json").read_text())  # scored on round 1's winner
    assert round2["source"] == str(save / out["rounds"][0]["best"]["student"])
    assert out["rounds"][0]["best"]["student"].startswith("rounds/1/")
    assert f"Teacher `{save / out['rounds'][0]['best']['student']}`" in (save / "rounds/2/report.md").read_text()
    assert rd.is_complete(save) and math.isfinite(out["best"]["val_loss"])
