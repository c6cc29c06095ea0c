"""Run dirs cross megatron-core versions: users upgrade containers mid-project, and a teacher
checkpoint must survive that. tests/fixtures/cross_version/ holds a `train` run dir written
under megatron-core 0.16.1 (Python 3.11) and one written under 0.19.2 (Python 3.12), each with
the val loss `evaluate` gave where it was written (make_fixture.py says how and why). Both
tiers run this file, so each version reads the other's bytes."""

import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from tests.commands import run_command, summary
from tests.fixtures.cross_version import make_fixture

pytestmark = [pytest.mark.compat, pytest.mark.slow]

FIXTURES = sorted(make_fixture.HERE.glob("mcore-*"))
CURRENT = f"mcore-{metadata.version('megatron-core')}"


def test_both_ends_of_the_range_have_a_fixture():
    """Catches a fixture lost or renamed: the cross-version tests below would then test less."""
    assert {p.name for p in FIXTURES} >= {"mcore-0.16.1", "mcore-0.19.2"}, FIXTURES


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The fixture corpus, copied: Megatron writes its index caches beside nothing of ours,
    but a test must never write into the repository."""
    return Path(shutil.copytree(make_fixture.DATA, tmp_path_factory.mktemp("cross") / "data"))


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_evaluate_gives_the_val_loss_of_the_version_that_wrote_it(fixture, corpus, tmp_path):
    """Catches a checkpoint another megatron-core wrote that no longer loads (dist_checkpointing's
    common state moved out of common.pt in 0.19; pickled rng and args state), or loads into the
    wrong places (the loss would differ)."""
    run = shutil.copytree(fixture, tmp_path / "run")
    expected = json.loads((run / "expected.json").read_text())
    got = summary(run_command("evaluate", f"load={run}", *make_fixture.data_args(corpus), *expected["evaluate"],
                              "device=cpu", env={"MINITRON_CACHE": str(corpus.parent / "cache")}))
    assert got["val_loss"] == pytest.approx(expected["val_loss"], rel=0, abs=1e-6), (expected, got)


@pytest.mark.parametrize("fixture", [p for p in FIXTURES if p.name != CURRENT], ids=lambda p: p.name)
def test_prune_and_distill_run_on_the_other_versions_teacher(fixture, corpus, tmp_path):
    """Catches a teacher from another release that evaluates but cannot be pruned or distilled
    (importance hooks, the trimmer's sharded load, the teacher load beside a student)."""
    teacher = shutil.copytree(fixture, tmp_path / "teacher")
    env = {"MINITRON_CACHE": str(corpus.parent / "cache")}
    data = make_fixture.data_args(corpus)
    pruned = summary(run_command(
        "prune", f"load={teacher}", *data, "prune.target.hidden_size=24", "prune.target.ffn_hidden_size=48",
        "prune.importance.calibration_samples=8", "prune.importance.micro_batch_size=4",
        "evaluate.samples=16", "evaluate.micro_batch_size=4", f"save={tmp_path / 'pruned'}", "device=cpu", env=env))
    assert pruned["params_after"] < pruned["params_before"]
    distilled = summary(run_command(
        "distill", f"teacher.load={teacher}", f"student.load={tmp_path / 'pruned'}", *data, "distill.steps=2",
        "distill.micro_batch_size=4", "distill.global_batch_size=8", "distill.eval_samples=8",
        f"save={tmp_path / 'student'}", "device=cpu", env=env))
    assert distilled["steps"] == 2 and distilled["val_loss"] < pruned["val_loss"] + 1.0
