"""Inside one search process (tests/search/spy_search.py): how often models are read, what the
candidates leave behind, and a candidate whose distillation diverges."""

import json
import subprocess
import sys

import pytest

from minitron_megatron.checkpoint import run_dir as rd
from tests.commands import ROOT, command_env, summary
from tests.search.test_search import BUDGET, SEARCH, SPACE


@pytest.fixture(scope="module")
def diverged_search(teacher, tmp_path_factory):
    """The two-candidate search of test_search.py, candidate 1's KD loss NaN from its first step."""
    save = tmp_path_factory.mktemp("spied") / "search"
    spy = save.parent / "spy.json"
    cmd = [sys.executable, "-m", "tests.search.spy_search", str(spy), "1", "--", f"load={teacher}", *SEARCH,
           *SPACE, *BUDGET, f"save={save}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=command_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return save, summary(proc), json.loads(spy.read_text())


def test_the_teacher_is_read_once_per_search_and_no_candidate_outlives_its_stage(teacher, diverged_search):
    """Catches the teacher read again by each candidate's trim and distillation (twice per
    candidate, minutes each at 70B), and a candidate's DDP, grad buffer and optimizer still alive
    when the next one starts (Megatron's DDP sits in reference cycles that only gc frees)."""
    save, _, spy = diverged_search
    teacher_root = str(rd.checkpoint_root(teacher).resolve())
    assert spy["loads"].count(teacher_root) == 1, spy["loads"]
    students = [r for r in spy["loads"] if r != teacher_root]  # each student starts from its pruned dir
    assert students == [str((save / f"candidates/{i}/pruned/checkpoint").resolve()) for i in (0, 1)]
    assert spy["left"] == [0, 0]


def test_a_diverging_candidate_is_marked_failed_and_the_others_ranked(diverged_search):
    """Catches one diverging candidate (NaN/Inf KD loss) ending the whole search with nothing
    ranked, and a failed candidate ranked or reported as done."""
    save, out, _ = diverged_search
    done, failed = out["candidates"]
    assert done["status"] == "done" and done["rank"] == 1 and out["best"] == done
    assert failed["status"] == "failed: distill diverged at step 1 (kd_loss = nan)", failed
    assert failed["rank"] is None and failed["val_loss"] is None and failed["zero_shot_loss"] is not None
    assert json.loads((save / "candidates/1/failed.json").read_text())["component"] == "kd_loss"
    assert rd.read_summary(save) == out and "failed: distill diverged" in (save / "report.md").read_text()


def test_a_round_where_every_candidate_diverges_exits_3_and_stays_incomplete(teacher, tmp_path):
    """Catches a search that, with nothing to rank, crashes on the missing winner (or writes a
    summary.json that looks complete): it must exit 3 as a diverged `distill` does, naming every
    candidate, with candidates.json saying why."""
    save = tmp_path / "search"
    cmd = [sys.executable, "-m", "tests.search.spy_search", str(tmp_path / "spy.json"), "all", "--",
           f"load={teacher}", *SEARCH, *SPACE, *BUDGET, f"save={save}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=command_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "every candidate's distillation diverged (#0 distill diverged at step 1" in proc.stderr
    assert not rd.is_complete(save)
    statuses = [e["status"] for e in json.loads((save / "candidates.json").read_text())]
    assert statuses == ["failed: distill diverged at step 1 (kd_loss = nan)"] * 2
