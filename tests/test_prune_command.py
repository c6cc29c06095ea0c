"""`python -m minitron_megatron.prune` end to end: importance -> trim -> zero-shot eval -> run dir."""

import json
import math
from pathlib import Path

import pytest

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.runtime.faults import FAULT_ENV, FAULT_EXIT
from tests.commands import run_command, summary
from tests.dist_utils import run_distributed

pytestmark = pytest.mark.slow  # minutes: run first (tests/conftest.py)

PRUNE = ["prune.importance.calibration_samples=16", "prune.importance.depth_samples=16",
         "prune.importance.micro_batch_size=4", "evaluate.samples=16", "evaluate.micro_batch_size=4", "device=cpu"]


@pytest.fixture(scope="module")
def teacher(small_teacher):
    """The session's briefly trained teacher run dir (tests/conftest.py), read by every prune run."""
    return small_teacher


def test_prune_at_tp2_writes_a_loadable_smaller_model(tmp_path, teacher):
    """Catches a broken hand-off between the stages (score names/shapes), a summary that
    disagrees with the saved model, or a pruned run dir that does not load elsewhere."""
    pruned = tmp_path / "pruned"
    out = summary(run_command("prune", f"load={teacher}", *PRUNE, "parallel.tp=2",
                              "prune.target.hidden_size=48", "prune.target.ffn_hidden_size=96",
                              "prune.target.num_attention_heads=2", "prune.target.num_query_groups=2",
                              f"save={pruned}", nproc=2))
    assert out["params_after"] < out["params_before"] and math.isfinite(out["val_loss"])
    for name in ("importance.safetensors", "importance.json", "trim_plan.json", "model.yaml"):
        assert (pruned / name).is_file(), name
    assert rd.is_complete(pruned) and json.loads((pruned / "summary.json").read_text()) == out
    cfg, _, _ = rd.read_model_yaml(pruned)
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads) == (48, 96, 2)
    again = summary(run_command("evaluate", f"load={pruned}", "device=cpu", "evaluate.samples=16",
                                "evaluate.micro_batch_size=4"))
    assert again["params"] == out["params_after"]
    assert math.isclose(again["val_loss"], out["val_loss"], rel_tol=1e-5)


def test_impossible_target_lists_every_problem_and_writes_nothing(tmp_path, teacher):
    proc = run_command("prune", f"load={teacher}", *PRUNE, "prune.target.hidden_size=999",
                       "prune.target.num_attention_heads=3", f"save={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2
    assert "hidden_size=999" in proc.stderr and "num_attention_heads=3" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_crash_while_saving_the_pruned_model_never_looks_complete_and_reruns(tmp_path, teacher):
    """Catches a pruned run dir that looks finished after a crash between its checkpoint and
    its summary, or a rerun that refuses the unfinished dir or prunes differently."""
    target = ["prune.target.hidden_size=48", "prune.target.ffn_hidden_size=96", f"load={teacher}", *PRUNE]
    reference = summary(run_command("prune", *target, f"save={tmp_path / 'reference'}"))
    crashed = tmp_path / "crashed"
    proc = run_command("prune", *target, f"save={crashed}", check=False, env={FAULT_ENV: "trim.save"})
    assert proc.returncode == FAULT_EXIT, proc.stderr[-3000:]
    assert (crashed / "checkpoint" / "latest_checkpointed_iteration.txt").is_file() and not rd.is_complete(crashed)
    rerun = summary(run_command("prune", *target, f"save={crashed}"))
    assert rd.is_complete(crashed)
    assert {k: rerun[k] for k in ("params_after", "val_loss")} == {k: reference[k] for k in ("params_after", "val_loss")}
    assert (crashed / "trim_plan.json").read_text() == (tmp_path / "reference" / "trim_plan.json").read_text()


def _count_calls(module, name: str, counts: dict) -> None:
    original = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


def _prune_once_worker(rank, world, root):
    """Every stage of `prune` in one process, counting checkpoint reads, dataset builds
    and target validations."""
    from megatron.core import dist_checkpointing

    from minitron_megatron.checkpoint import dist as ckpt
    from minitron_megatron.config.commands import EvaluateConfig, PruneCommand
    from minitron_megatron.config.prune import ImportanceConfig, PruneConfig, TrimTarget
    from minitron_megatron.recipes.prune import prune
    from minitron_megatron.runtime import init_runtime
    from minitron_megatron.train import setup
    from minitron_megatron.trim import stage
    from tests.model_utils import make_run_dir

    root = Path(root)
    ctx = init_runtime(device="cpu", seed=3)
    make_run_dir(root / "teacher", ctx)
    counts = {}
    _count_calls(ckpt, "load_checkpoint", counts)
    _count_calls(dist_checkpointing, "load", counts)
    _count_calls(setup, "build_gpt_datasets", counts)
    _count_calls(stage, "validate_target", counts)
    icfg = ImportanceConfig(calibration_samples=8, depth_samples=8, micro_batch_size=4)
    target = TrimTarget(hidden_size=48, ffn_hidden_size=96, num_layers=3)
    evaluate = EvaluateConfig(samples=8, micro_batch_size=4)

    def run(save, **prune_settings):
        counts.clear()
        cfg = PruneCommand(load=str(root / "teacher"), save=str(root / save), device="cpu", evaluate=evaluate,
                           prune=PruneConfig(target=target, importance=icfg, **prune_settings))
        return prune(cfg, ctx), dict(counts)

    full, counted = run("all")
    assert counted == {"load_checkpoint": 1, "load": 1, "build_gpt_datasets": 1, "validate_target": 1}, counted
    _, counted = run("scores", stage="importance")
    assert counted == {"load_checkpoint": 1, "load": 1, "build_gpt_datasets": 1}, counted
    split, counted = run("split", stage="trim", scores=str(root / "scores"))
    assert counted == {"load_checkpoint": 1, "load": 1, "build_gpt_datasets": 1, "validate_target": 1}, counted
    assert split["val_loss"] == full["val_loss"] and split["params_after"] == full["params_after"]
    assert json.loads((root / "split" / "trim_plan.json").read_text()) == \
        json.loads((root / "all" / "trim_plan.json").read_text())


def test_prune_reads_the_checkpoint_once_per_stage(tmp_path):
    """Catches `prune` reading the checkpoint (15B: minutes and a second model in memory),
    building the datasets or validating the target more than once; and a stage=importance
    + stage=trim pair that prunes differently from stage=all."""
    run_distributed(_prune_once_worker, 1, str(tmp_path))
