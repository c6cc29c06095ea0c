"""The train/evaluate commands under real multi-process parallelism (torchrun over gloo)."""

import math
import shutil

import pytest

from tests.commands import SMALL, run_command, step_losses, summary

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.slow
# The compatibility tier runs the tests marked compat (TP=2 x PP=2 covers the pipeline schedule PP=2 alone runs).

STEPS = ["train.steps=4", "train.eval_interval=4", "train.save_interval=4"]
EVAL = ["device=cpu", "evaluate.samples=16", "evaluate.micro_batch_size=4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Shared starting weights: per-stage init at PP=2 draws different random numbers
    than PP=1 (as in Megatron-LM), so curves are compared from one loaded checkpoint."""
    save = tmp_path_factory.mktemp("base") / "run"
    run_command("train", *SMALL, "train.steps=1", "train.eval_interval=1", f"save={save}")
    return save


@pytest.fixture(scope="module")
def pp1_run(tmp_path_factory, base):
    save = tmp_path_factory.mktemp("pp1") / "run"
    out = summary(run_command("train", *SMALL, *STEPS, f"load={base}", f"save={save}"))
    return save, out


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, base):
    save = tmp_path_factory.mktemp("tp2") / "run"
    out = summary(run_command("train", *SMALL, *STEPS, "parallel.tp=2", f"load={base}", f"save={save}", nproc=2))
    return save, out


def _assert_same_curve(run_a, run_b, rel):
    a, b = step_losses(run_a), step_losses(run_b)
    assert sorted(a) == sorted(b) == list(range(1, len(a) + 1))
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=rel), (step, a[step], b[step])


def test_pp2_training_follows_pp1(pp1_run, base, tmp_path):
    """Catches a broken pipeline schedule, p2p shapes, embedding grad sync across stages
    or per-stage init differences: PP=2 must train exactly like PP=1."""
    save, ref = pp1_run
    out = summary(run_command("train", *SMALL, *STEPS, "parallel.pp=2", f"load={base}",
                              f"save={tmp_path / 'pp2'}", nproc=2))
    _assert_same_curve(save, tmp_path / "pp2", rel=1e-5)
    assert math.isclose(out["val_loss"], ref["val_loss"], rel_tol=1e-5)
    assert out["params"] == ref["params"]


@pytest.mark.compat
def test_tp2_training_follows_tp1(pp1_run, tp2_run):
    """Catches TP-sharded optimizer/grad-clipping errors (e.g. norms of replicated
    parameters counted twice): TP=2 training must follow the TP=1 loss curve."""
    (save, ref), (tp2_save, out) = pp1_run, tp2_run
    _assert_same_curve(save, tp2_save, rel=1e-4)
    assert out["params"] == ref["params"]


@pytest.mark.compat
def test_save_tp2_load_tp1_pp2_and_as_megatron_lm_dir(tp2_run, tmp_path):
    """Catches checkpoints that are not reshardable (local instead of global offsets,
    layer numbering per stage): a run saved at TP=2 evaluates identically at TP=2,
    TP=1 and PP=2. Also catches a loader that needs our model.yaml or mis-sizes the
    padded vocab: the same checkpoint as a Megatron-LM save dir (tracker +
    iter_XXXXXXX/ torch_dist shards under Megatron-LM's top-level keys model,
    optimizer, opt_param_scheduler, iteration, checkpoint_version) loads given only
    the model settings. Megatron-LM itself is not a dependency, so that dir is our
    checkpoint/ copied out of its run dir: the files a Megatron-LM --save dir holds."""
    save, _ = tp2_run
    at_tp2 = summary(run_command("evaluate", f"load={save}", *EVAL, "parallel.tp=2", nproc=2))
    at_tp1 = summary(run_command("evaluate", f"load={save}", *EVAL))
    at_pp2 = summary(run_command("evaluate", f"load={save}", *EVAL, "parallel.pp=2", nproc=2))
    assert at_tp2["params"] == at_tp1["params"] == at_pp2["params"]
    assert math.isclose(at_tp1["val_loss"], at_tp2["val_loss"], rel_tol=1e-5)
    assert math.isclose(at_pp2["val_loss"], at_tp1["val_loss"], rel_tol=1e-6)

    megatron_dir = tmp_path / "megatron_lm_save"
    shutil.copytree(save / "checkpoint", megatron_dir)
    model_args = [a for a in SMALL if a.startswith(("model", "seq_length"))]  # no model.yaml: the user's
    assert summary(run_command("evaluate", f"load={megatron_dir}", *model_args, *EVAL)) == at_tp1


@pytest.mark.compat
def test_tp2_pp2_training_follows_pp1(pp1_run, base, tmp_path):
    """Catches interactions of TP and PP (p2p tensors sharded wrongly, TP groups
    crossing stages, DP/TP/PP rank layout): 4 ranks at TP=2 x PP=2 follow the PP=1 curve."""
    save, ref = pp1_run
    out = summary(run_command("train", *SMALL, *STEPS, "parallel.tp=2", "parallel.pp=2", f"load={base}",
                              f"save={tmp_path / 'tp2pp2'}", nproc=4))
    _assert_same_curve(save, tmp_path / "tp2pp2", rel=1e-4)
    assert out["params"] == ref["params"]
