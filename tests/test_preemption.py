"""Preemption: SIGTERM to a running 2-rank `train` under torchrun, then the same command again.

SLURM signals a job before it kills it (time limit, preemption, `scancel`); torchrun
forwards SIGTERM to its workers (each in its own session) and waits 30 s for them.
The workers finish their step, save, and exit; the rerun must continue exactly.
"""

import json
import math
import os
import signal
import subprocess
import time

import pytest

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.dist import latest_iteration
from minitron_megatron.runtime.preemption import PREEMPTED_EXIT
from tests.commands import ROOT, SMALL, command_env, command_line, run_command, step_losses, summary

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = [pytest.mark.compat, pytest.mark.slow]

STEPS = 16
RUN = [*SMALL, f"train.steps={STEPS}", "train.eval_interval=100", "train.save_interval=4"]
"""A periodic checkpoint is committed before SIGTERM: its writer's helper processes exist then."""


def _logged_steps(save) -> int:
    log = save / "train_log.jsonl"
    if not log.is_file():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.endswith("}") and '"kind": "step"' in line)


def test_sigterm_under_torchrun_saves_and_the_rerun_resumes_exactly(tmp_path):
    """Catches a preemption that loses the steps since the last save (no checkpoint on
    SIGTERM), ranks that disagree on the step they stop at (a hang or mismatched
    shards), a run dir that looks complete after it, and a resume that diverges. At DP=2 the
    saves and the resume are fully parallel (the default), so it also catches a fully-parallel
    round trip that differs from an uninterrupted run. The signal goes to the whole process
    group after a periodic save, as SLURM signals every process of a job step: it catches the
    checkpoint writer's result queue (a multiprocessing Manager, started by the first save)
    dying of the SIGTERM, which failed the preemption save with a BrokenPipeError."""
    full, split = tmp_path / "full", tmp_path / "split"
    ref = summary(run_command("train", *RUN, f"save={full}", nproc=2))

    proc = subprocess.Popen(command_line("train", *RUN, f"save={split}", nproc=2), cwd=ROOT, env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while (_logged_steps(split) < 2 or latest_iteration(split / "checkpoint") is None) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun's process group, as a scheduler signals the job
    out, err = proc.communicate(timeout=120)
    stopped_at = latest_iteration(split / "checkpoint")
    assert stopped_at is not None and 2 <= stopped_at < STEPS, (stopped_at, out[-2000:], err[-4000:])
    assert not rd.is_complete(split)
    assert f"exitcode: {PREEMPTED_EXIT}" in err or '"preempted"' in out, err[-4000:]
    logged = [json.loads(line)["step"] for line in (split / "train_log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, stopped_at + 1)), "the step in flight finished, no later one started"

    resumed = run_command("train", *RUN, f"save={split}", nproc=2)
    assert f"resuming {split} from step {stopped_at}" in resumed.stdout
    a, b = step_losses(full), step_losses(split)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert math.isclose(a[step], b[step], rel_tol=1e-6, abs_tol=1e-7), (step, a[step], b[step])
    assert math.isclose(summary(resumed)["val_loss"], ref["val_loss"], rel_tol=1e-6)
