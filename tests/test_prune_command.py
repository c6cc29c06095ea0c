"""`python -m minitron_megatron.prune` end to end: importance -> trim -> zero-shot eval -> run dir."""

import json
import math

from minitron_megatron.checkpoint import run_dir as rd
from tests.commands import SMALL, run_command, summary

PRUNE = ["prune.importance.calibration_samples=16", "prune.importance.depth_samples=16",
         "prune.importance.micro_batch_size=4", "evaluate.samples=16", "evaluate.micro_batch_size=4", "device=cpu"]


def test_prune_at_tp2_writes_a_loadable_smaller_model(tmp_path):
    """Catches a broken hand-off between the stages (score names/shapes), a summary that
    disagrees with the saved model, or a pruned run dir that does not load elsewhere."""
    teacher, pruned = tmp_path / "teacher", tmp_path / "pruned"
    run_command("train", *SMALL, "train.steps=3", "train.eval_interval=3", f"save={teacher}")
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


def test_impossible_target_lists_every_problem_and_writes_nothing(tmp_path):
    teacher = tmp_path / "teacher"
    run_command("train", *SMALL, "train.steps=1", "train.eval_interval=1", f"save={teacher}")
    proc = run_command("prune", f"load={teacher}", *PRUNE, "prune.target.hidden_size=999",
                       "prune.target.num_attention_heads=3", f"save={tmp_path / 'out'}", check=False)
    assert proc.returncode == 2
    assert "hidden_size=999" in proc.stderr and "num_attention_heads=3" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
