"""The sbatch templates' preemption handling, run by bash with stand-ins for srun and scontrol.

No SLURM here: `srun` is a script that records its arguments, waits, and exits 75
when it gets SIGTERM (as our ranks do after saving); `scontrol` records what it was
asked. The batch script gets SIGUSR1 as `#SBATCH --signal=B:USR1@120` delivers it.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.commands import ROOT

FAKE_SRUN = """#!/bin/bash
echo "$@" > "$LOG_DIR/srun.args"
trap 'echo TERM >> "$LOG_DIR/srun.signals"; exit 75' TERM
touch "$LOG_DIR/srun.started"
for i in $(seq 600); do sleep 0.1; done
exit 0
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show ]]; then echo node1; exit 0; fi
echo "$@" >> "$LOG_DIR/scontrol.calls"
"""


def _stand_ins(tmp_path: Path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG_DIR": str(tmp_path), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "SLURM_SUBMIT_DIR": str(ROOT)}


@pytest.mark.parametrize("script", ["task_per_gpu", "torchrun_per_node"])
def test_usr1_before_the_time_limit_stops_the_ranks_and_requeues(tmp_path, script):
    """Catches a template that lets SLURM kill the ranks without a checkpoint (signal not
    forwarded) or that does not requeue, so a preempted run never resumes by itself."""
    env = {**os.environ, **_stand_ins(tmp_path)}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm" / f"{script}.sbatch"), "train", "save=runs/x"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "srun.started").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / "srun.signals").read_text().split() == ["TERM"]
    assert (tmp_path / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    assert "minitron_megatron.train" in (tmp_path / "srun.args").read_text()


def test_an_unsignalled_step_keeps_its_exit_status_and_is_not_requeued(tmp_path):
    env = {**os.environ, **_stand_ins(tmp_path)}
    (tmp_path / "bin" / "srun").write_text("#!/bin/bash\nexit 2\n")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "slurm" / "task_per_gpu.sbatch"), "train"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and not (tmp_path / "scontrol.calls").exists()
