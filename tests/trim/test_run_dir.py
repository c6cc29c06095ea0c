"""A pruned run dir, written at TP=2, is a normal run dir: it evaluates identically at TP=1 and PP=2."""

import json
import math
from pathlib import Path

import pytest

from tests.commands import run_command, summary
from tests.dist_utils import run_distributed
from tests.model_utils import make_run_dir as _make_teacher

pytestmark = pytest.mark.slow  # minutes: run first (tests/conftest.py)

SAMPLES, MBS = 16, 4
EVAL = ["device=cpu", f"evaluate.samples={SAMPLES}", f"evaluate.micro_batch_size={MBS}"]


def _trim_worker(rank, world, root):
    from minitron_megatron.config.commands import CommonConfig, EvaluateCommand, EvaluateConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.prune import PruneConfig, TrimTarget
    from minitron_megatron.errors import ConfigError
    from minitron_megatron.runtime import init_runtime
    from minitron_megatron.recipes.evaluate import evaluate_run
    from minitron_megatron.trim import trim_stage

    root = Path(root)
    ctx = init_runtime(tp=2, pp=1, device="cpu", seed=7)
    _make_teacher(root / "teacher", ctx)
    cfg = CommonConfig(load=str(root / "teacher"), save=str(root / "pruned"), device="cpu",
                       parallel=ParallelConfig(tp=2))
    bad = PruneConfig(target=TrimTarget(hidden_size=1000, num_attention_heads=3, ffn_hidden_size=97))
    try:
        trim_stage(cfg, bad, ctx, eval_samples=SAMPLES)
        raise AssertionError("an impossible target was accepted")
    except ConfigError as err:
        problems = err.problems
    assert not (root / "pruned").exists(), "a rejected target must write nothing"
    prune = PruneConfig(method="magnitude", target=TrimTarget(hidden_size=48, num_attention_heads=2,
                                                              ffn_hidden_size=128, num_layers=3))
    trimmed = trim_stage(cfg, prune, ctx, eval_samples=SAMPLES, eval_micro_batch_size=MBS)
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=7)  # same processes: TP=1 x DP=2
    at_tp1 = evaluate_run(EvaluateCommand(load=str(root / "pruned"), device="cpu",
                                          evaluate=EvaluateConfig(samples=SAMPLES, micro_batch_size=MBS)), ctx)
    if rank == 0:
        (root / "out.json").write_text(json.dumps({"bad": problems, "trimmed": trimmed, "tp1": at_tp1}))


def test_pruned_run_dir_loads_at_other_tp_and_pp(tmp_path):
    """Catches a pruned checkpoint that is not reshardable (wrong global shapes/offsets, stale
    layer numbering), a model.yaml that does not rebuild the pruned architecture, a parameter
    summary that disagrees with the loaded model, and a bad target that is not reported in
    full or that leaves files behind. The PP=2 reload goes through the real command line."""
    run_distributed(_trim_worker, 2, str(tmp_path))
    out = json.loads((tmp_path / "out.json").read_text())
    bad = "\n".join(out["bad"])  # hidden out of range; heads vs groups; heads and ffn vs TP
    assert len(out["bad"]) == 4 and "hidden_size=1000" in bad and "ffn_hidden_size=97" in bad, bad
    trimmed, pruned = out["trimmed"], tmp_path / "pruned"
    assert json.loads((pruned / "summary.json").read_text()) == trimmed
    assert (pruned / "trim_plan.json").is_file() and trimmed["params_after"] < trimmed["params_before"]
    at_pp2 = summary(run_command("evaluate", f"load={pruned}", *EVAL, "parallel.pp=2", nproc=2))
    _check_bad_target_cli(tmp_path)
    assert out["tp1"]["params"] == at_pp2["params"] == trimmed["params_after"]
    assert math.isclose(out["tp1"]["val_loss"], trimmed["val_loss"], rel_tol=1e-5)
    assert math.isclose(at_pp2["val_loss"], trimmed["val_loss"], rel_tol=1e-5)


def _check_bad_target_cli(tmp_path):
    """`prune` with an impossible target: exit 2, every problem in one message, nothing written."""
    bad = run_command("prune", f"load={tmp_path / 'teacher'}", f"save={tmp_path / 'bad'}", "device=cpu",
                      "prune.target.hidden_size=1000", "prune.target.num_attention_heads=3",
                      "prune.target.num_layers=9", "prune.method=bogus", check=False)
    assert bad.returncode == 2, bad.stderr[-2000:]
    for needle in ("prune.method='bogus'", "hidden_size=1000", "num_layers=9", "num_attention_heads=3"):
        assert needle in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()
