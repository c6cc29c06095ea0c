"""`prune` computes loss-based depth metrics only when the target needs them (issue 11 item 6)."""

import json

from tests.commands import run_command

PRUNE = ["device=cpu", "prune.importance.calibration_samples=16", "prune.importance.depth_samples=16",
         "prune.importance.micro_batch_size=4", "evaluate.samples=16", "evaluate.micro_batch_size=4",
         "prune.target.hidden_size=48", "prune.target.ffn_hidden_size=96"]


def scored(run_dir) -> set:
    return set(json.loads((run_dir / "importance.json").read_text())["scores"])


def test_width_only_target_skips_loss_depth_metrics_unless_asked(teacher, tmp_path):
    """Catches extra validation passes for a width-only target, and a user's explicit
    depth_metrics list being overridden by the default."""
    run_command("prune", f"load={teacher}", *PRUNE, f"save={tmp_path / 'auto'}")
    auto = scored(tmp_path / "auto")
    assert "depth.block_importance" in auto and not auto & {"depth.loss_drop", "depth.contiguous"}
    assert {"attn.head", "mlp.neuron", "hidden.channel"} <= auto
    run_command("prune", f"load={teacher}", *PRUNE, "prune.importance.depth_metrics=[loss_drop,contiguous]",
                f"save={tmp_path / 'asked'}")
    asked = scored(tmp_path / "asked")
    assert {"depth.loss_drop", "depth.contiguous"} <= asked and "depth.block_importance" not in asked
