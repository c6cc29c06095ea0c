"""Stop-and-resume and crash safety of `train` run directories."""

import json
import math
import os
import signal
import subprocess
import sys
import time

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.dist import latest_iteration
from tests.commands import ROOT, SMALL, run_command, step_losses, summary

RUN = [*SMALL, "train.steps=8", "train.eval_interval=4", "train.save_interval=2"]


def test_stop_and_resume_gives_the_same_later_losses(tmp_path):
    """Catches resume bugs: lost optimizer moments, LR schedule restarting, data order
    restarting at sample 0, RNG not restored. Losses after the stop must match."""
    full, split = tmp_path / "full", tmp_path / "split"
    ref = summary(run_command("train", *RUN, f"save={full}"))
    stopped = summary(run_command("train", *RUN, "train.exit_after_steps=3", f"save={split}"))
    assert stopped == {"stopped_at": 3, "steps": 8, "resumable": True}
    assert not rd.is_complete(split) and latest_iteration(split / "checkpoint") == 3
    resumed = summary(run_command("train", *RUN, f"save={split}"))
    a, b = step_losses(full), step_losses(split)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert math.isclose(a[step], b[step], rel_tol=1e-6, abs_tol=1e-7), (step, a[step], b[step])
    assert math.isclose(resumed["val_loss"], ref["val_loss"], rel_tol=1e-6)


def test_killed_run_resumes_from_last_committed_checkpoint(tmp_path):
    """Catches non-atomic saves: a SIGKILL at any moment leaves either the previous
    committed checkpoint or the new one, never a run dir that looks complete."""
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "minitron_megatron.train", *RUN, "train.steps=40", f"save={save}"]
    # Own session: the kill takes the whole group, as a scheduler would, including the
    # Manager process Megatron's checkpoint writer spawns (else it is left orphaned).
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MINITRON_NO_PROGRESS": "1",
                                 "PYTHONPATH": str(ROOT)})
    deadline = time.time() + 300
    while latest_iteration(save / "checkpoint") is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.7)  # land somewhere in the middle of later steps/saves
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not rd.is_complete(save)
    committed = latest_iteration(save / "checkpoint")
    assert committed is not None and committed % 2 == 0
    out = summary(run_command("train", *RUN, "train.steps=40", f"save={save}"))
    assert out["steps"] == 40 and rd.is_complete(save)
    log = [json.loads(l) for l in (save / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "step"] == list(range(1, 41))
