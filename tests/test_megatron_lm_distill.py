"""docs/distill.md's Megatron-LM drop-in, run as written, at PP=2 in Megatron-LM's own loop.

`examples/megatron_lm/distill.sh` trains a small teacher and prunes it with our commands,
pastes the doc's snippet for the tag over the `__main__` block of Megatron-LM's pretrain_gpt.py
(the tag paired with the installed megatron-core, megatron_compat.MEGATRON_LM_TAG: core_v0.16.1
or core_v0.19.0, archived from a git dir) and trains the student by KD under torchrun over gloo
(2 ranks, PP=2). `SAVE=0` keeps it cheap (~50 s of CPU): the script's default also saves and
reads the saved student back with our `evaluate` (run by hand, docs/distill.md). Skipped
without a Megatron-LM git dir (`MEGATRON_LM_GIT`, default the mirror tests/megatron_lm_parser.py
uses): Megatron-LM's training code is on no package index.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minitron_megatron.runtime.distributed import free_port
from tests.commands import ROOT, SMALL, command_env
from tests.megatron_lm_parser import DEFAULT_GIT, TAG

# The compatibility tier (Python 3.12, megatron-core 0.19.2, Megatron-LM core_v0.19.0) runs this file too.
pytestmark = pytest.mark.compat

SCRIPT = ROOT / "examples" / "megatron_lm" / "distill.sh"
ITERS = 3


def _git_dir():
    git_dir = os.environ.get("MEGATRON_LM_GIT", DEFAULT_GIT)
    if not Path(git_dir).exists():
        return None
    tags = subprocess.run(["git", "--git-dir", git_dir, "tag", "-l", TAG], capture_output=True, text=True)
    return git_dir if tags.stdout.strip() == TAG else None


@pytest.mark.slow
def test_doc_snippet_distils_a_pruned_student_in_megatron_lm_at_pp2(tmp_path):
    """Catches docs/distill.md's snippet not running as written against pretrain_gpt.py at the
    tag (a renamed import, get_batch's arity, provider arguments, pretrain()'s signature), our DistillationModel failing
    in Megatron-LM's pipeline schedule (receive buffers sized from config.hidden_size, the
    'counter-productive to free a view' assertion of deallocate_pipeline_outputs on a loss that is
    a view), Megatron-LM's loop not reporting our loss keys, and a student that does not learn."""
    git_dir = _git_dir()
    if git_dir is None:
        pytest.skip(f"no Megatron-LM git dir with tag {TAG} (set MEGATRON_LM_GIT)")
    env = command_env({
        "MEGATRON_LM_GIT": git_dir, "PYTHON": sys.executable, "PP": "2", "TP": "1", "NPROC": "2",
        "ITERS": str(ITERS), "SAVE": "0", "MASTER_PORT": str(free_port()),
        "TEACHER_ARGS": " ".join([*SMALL, "train.steps=4"]),
        # magnitude: no calibration pass, the student is ready in seconds
        "PRUNE_ARGS": "prune.method=magnitude prune.target.hidden_size=48 prune.target.ffn_hidden_size=96",
    })
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    kd = summary["kd loss"]
    assert summary["iterations"] == list(range(1, ITERS + 1)) and summary["pp"] == 2
    assert all(math.isfinite(v) for v in kd + summary["lm loss"]), summary
    assert kd[-1] < kd[0], summary
