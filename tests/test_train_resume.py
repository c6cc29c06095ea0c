"""Stop-and-resume and crash safety of `train` run directories.

Crashes are injected at exact commit points (runtime/faults.py: the process
`os._exit`s there, as a SIGKILL would) instead of killing after a sleep, which
almost never hits the few milliseconds a commit takes.
"""

import json
import math

import pytest

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.dist import latest_iteration
from minitron_megatron.runtime.faults import FAULT_ENV, FAULT_EXIT
from tests.commands import run_command, step_losses, summary, SMALL

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.slow
# The compatibility tier runs the tests marked compat: a crash at every commit point (each resume
# compared with the uninterrupted run) and the async writer's, which cover the plain stop/resume.

RUN = [*SMALL, "train.steps=8", "train.eval_interval=4", "train.save_interval=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run of RUN: the reference every interrupted run must reproduce."""
    save = tmp_path_factory.mktemp("full") / "run"
    return summary(run_command("train", *RUN, f"save={save}")), step_losses(save)


def _assert_same_run(save, uninterrupted, final: dict) -> None:
    ref, ref_losses = uninterrupted
    losses = step_losses(save)
    records = [json.loads(line) for line in (save / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 9))  # each step once
    for step in range(1, 9):
        assert math.isclose(losses[step], ref_losses[step], rel_tol=1e-6, abs_tol=1e-7), (step, losses, ref_losses)
    assert math.isclose(final["val_loss"], ref["val_loss"], rel_tol=1e-6)


def test_stop_and_resume_gives_the_same_later_losses(tmp_path, uninterrupted):
    """Catches resume bugs: lost optimizer moments, LR schedule restarting, data order
    restarting at sample 0, RNG not restored. Losses after the stop must match. Also catches
    step checkpoints piling up (or the one resumed from deleted): train.keep_last=2 keeps the
    two newest committed iterations, before and after the resume."""
    split = tmp_path / "split"
    stopped = summary(run_command("train", *RUN, "train.exit_after_steps=3", f"save={split}"))
    assert stopped == {"stopped_at": 3, "steps": 8, "resumable": True}
    assert not rd.is_complete(split) and latest_iteration(split / "checkpoint") == 3
    assert _iterations(split) == [2, 3]  # saved at 2 and 3
    resumed = summary(run_command("train", *RUN, f"save={split}"))
    _assert_same_run(split, uninterrupted, resumed)
    assert _iterations(split) == [6, 8]  # saved at 4, 6, 8 after resuming from 3


def _iterations(save) -> list:
    return sorted(int(p.name[len("iter_"):]) for p in (save / "checkpoint").glob("iter_*"))


# (fault, the committed iteration it leaves, what else it leaves on disk). Each rerun
# resumes from what the previous crash left, so one run dir walks through all of them.
CHAIN = [
    ("log.append:3", 2, "half of step 3's log line"),
    ("checkpoint.write:2", 4, "iteration 6's shards in .iter_0000006.tmp"),
    ("checkpoint.commit:1", 4, "iter_0000006/ renamed into place, the tracker still at 4"),
    ("summary.write:1", 8, "the final checkpoint, summary.json only as a temporary file"),
]


@pytest.mark.compat
def test_a_crash_at_every_commit_point_resumes_like_an_uninterrupted_run(tmp_path, uninterrupted):
    """Catches non-atomic commits: after a crash at any commit point the run dir never
    looks complete, the rerun resumes from the last committed checkpoint (never from
    a half-written one, never from scratch), and the losses equal an uninterrupted run's."""
    save = tmp_path / "run"
    for fault, committed, leaves in CHAIN:
        proc = run_command("train", *RUN, f"save={save}", check=False, env={FAULT_ENV: fault})
        assert proc.returncode == FAULT_EXIT, (fault, proc.stderr[-3000:])
        assert not rd.is_complete(save), (fault, leaves)
        assert latest_iteration(save / "checkpoint") == committed, (fault, leaves)
        if fault.startswith("log.append"):
            assert not (save / "train_log.jsonl").read_text().endswith("\n"), "the fault must tear the line"
        if fault.startswith("checkpoint.write"):
            assert (save / "checkpoint" / ".iter_0000006.tmp").is_dir()
        if fault.startswith("checkpoint.commit"):
            assert (save / "checkpoint" / "iter_0000006").is_dir()
    final = run_command("train", *RUN, f"save={save}")
    assert rd.is_complete(save) and "resuming" in final.stdout
    _assert_same_run(save, uninterrupted, summary(final))


def test_a_torn_log_line_is_dropped_with_a_warning_on_resume(tmp_path):
    """Catches a resume that crashes on (or keeps) a half-written log line."""
    save = tmp_path / "run"
    run = [*RUN, "train.steps=3", "train.save_interval=1", "train.eval_interval=3"]
    torn = run_command("train", *run, f"save={save}", check=False, env={FAULT_ENV: "log.append:2"})
    assert torn.returncode == FAULT_EXIT
    resumed = run_command("train", *run, f"save={save}")
    assert "dropping a torn log line" in resumed.stderr
    assert sorted(step_losses(save)) == [1, 2, 3]


def test_a_tracker_naming_a_missing_iteration_is_an_error_not_a_restart(tmp_path):
    """Catches the silent restart from scratch when the tracker names a deleted iter_ dir."""
    save = tmp_path / "run"
    run = [*RUN, "train.steps=4", "train.exit_after_steps=2"]
    run_command("train", *run, f"save={save}")
    (save / "checkpoint" / "latest_checkpointed_iteration.txt").write_text("7\n")
    proc = run_command("train", *RUN, f"save={save}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(save / "checkpoint" / "iter_0000007") in proc.stderr
    assert sorted(step_losses(save)) == [1, 2]  # nothing was retrained


@pytest.mark.compat
def test_a_crash_between_an_async_write_and_its_commit_leaves_the_previous_checkpoint(tmp_path, uninterrupted):
    """Catches an asynchronous save committed before its write finished, or whose commit a crash
    can half-do: with train.async_save the step-6 checkpoint is written in the background while
    training goes on, and a crash once its write is done but before its commit leaves step 4's
    as the latest; the rerun resumes from it with an uninterrupted run's losses. Also catches
    async checkpoints that are never committed (the tracker stuck at an earlier step)."""
    save, run = tmp_path / "run", [*RUN, "train.async_save=true"]
    # The third commit (steps 2, 4, 6): step 6's, whose write ran while steps 7 (and 8) trained.
    crashed = run_command("train", *run, f"save={save}", check=False, env={FAULT_ENV: "checkpoint.write:3"})
    assert crashed.returncode == FAULT_EXIT, crashed.stderr[-3000:]
    assert latest_iteration(save / "checkpoint") == 4 and not rd.is_complete(save)
    assert (save / "checkpoint" / ".iter_0000006.tmp").is_dir() and not (save / "checkpoint" / "iter_0000006").exists()
    assert max(step_losses(save)) >= 7, "training went on while step 6's checkpoint was written"
    final = run_command("train", *run, f"save={save}")
    assert "resuming" in final.stdout and _iterations(save) == [6, 8]
    _assert_same_run(save, uninterrupted, summary(final))
