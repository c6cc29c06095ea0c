"""The `tiny-moe` preset through the commands, as a user runs them: train, evaluate the run dir,
score it at EP=2 under torchrun; a bad EP size fails before any work."""

import pytest
import torch

from tests.commands import SMALL_MOE, run_command, summary

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def trained(tiny_moe):
    """The session's trained tiny-moe (tests/conftest.py; tests/search/test_search_moe.py reads it too)."""
    return tiny_moe


@pytest.fixture(scope="module")
def scored(trained, tmp_path_factory):
    """`prune prune.stage=importance` of the trained run dir at EP=2 (two processes)."""
    run_dir, _ = trained
    scored = tmp_path_factory.mktemp("moe_scores") / "scored"
    summary(run_command("prune", f"load={run_dir}", "device=cpu", "data=stdlib", "parallel.ep=2",
                        "parallel.moe_token_dispatcher_type=alltoall", "prune.stage=importance", f"save={scored}",
                        "prune.importance.calibration_samples=8", "prune.importance.depth_samples=16",
                        "prune.importance.micro_batch_size=4", nproc=2))
    return scored


def test_train_tiny_moe_then_evaluate_and_score_its_run_dir_at_ep2(trained, scored):
    """Catches a MoE model that trains but does not come back from its run dir: model.yaml
    without the MoE fields (a dense model would be rebuilt), expert weights saved under local
    instead of global expert indices (EP=2 would load rank 0's experts twice), or a command that
    does not pass parallel.ep to the runtime. `prune prune.stage=importance` at EP=2 reshards the
    EP=1 checkpoint over two processes: its baseline validation loss (the same first 16 samples)
    must be `evaluate`'s at EP=1, and it writes every MoE score at its global shape."""
    import json

    from safetensors.torch import load_file

    run_dir, trained_summary = trained
    assert trained_summary["steps"] == 3 and trained_summary["val_loss"] < 9
    common = [f"load={run_dir}", "device=cpu", "data=stdlib"]
    one = summary(run_command("evaluate", *common, "evaluate.samples=16", "evaluate.micro_batch_size=4"))
    assert one["params"] == trained_summary["params"]
    assert one["val_loss"] == pytest.approx(trained_summary["val_loss"], rel=1e-6)
    meta = json.loads((scored / "importance.json").read_text())
    assert meta["parallel"]["ep"] == 2 and meta["depth"]["samples"] == 16
    assert meta["depth"]["baseline_val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    scores = load_file(str(scored / "importance.safetensors"))
    layers, experts, width = 2, 8, 128
    assert scores["moe.expert"].shape == scores["moe.expert_frequency"].shape == (layers, experts)
    assert scores["moe.expert_neuron"].shape == (layers, experts, width) and scores["moe.neuron"].shape == (layers, width)
    torch.testing.assert_close(scores["moe.expert_frequency"].sum(-1), torch.full((layers,), 2.0))
    assert (scored / "importance_width.png").is_file()


def test_trim_tiny_moe_at_ep2_equals_ep1(trained, scored, tmp_path):
    """Catches a trim whose result depends on the EP layout (experts exchanged between EP ranks,
    router rows, per-expert neurons): 8 -> 4 experts, expert width 128 -> 64 and hidden 128 -> 96
    from the same scores at EP=1 and EP=2 give the same zero-shot validation loss, and the EP=2
    run dir loads back at EP=1 with that loss."""
    import json

    run_dir, _ = trained
    trim = [f"load={run_dir}", "device=cpu", "data=stdlib", "prune.stage=trim", f"prune.scores={scored}",
            "prune.target.num_moe_experts=4", "prune.target.moe_ffn_hidden_size=64", "prune.target.hidden_size=96",
            "evaluate.samples=16", "evaluate.micro_batch_size=4"]
    one = summary(run_command("prune", *trim, f"save={tmp_path / 'ep1'}"))
    two = summary(run_command("prune", *trim, "parallel.ep=2", f"save={tmp_path / 'ep2'}", nproc=2))
    assert two["params_after"] == one["params_after"] < one["params_before"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    plan = json.loads((tmp_path / "ep2" / "trim_plan.json").read_text())
    assert [len(kept) for kept in plan["experts"]] == [4, 4] and plan["notes"]["expert_metric"] == "contribution"
    back = summary(run_command("evaluate", f"load={tmp_path / 'ep2'}", "device=cpu", "data=stdlib",
                               "evaluate.samples=16", "evaluate.micro_batch_size=4"))
    assert back["params"] == one["params_after"]
    assert back["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)


def test_expert_parallel_size_that_does_not_divide_the_experts(tmp_path):
    """Catches an EP size that reaches Megatron's build-time assert (or a hang in its groups):
    exit 2, one error naming parallel.ep and the sizes that work, nothing written."""
    proc = run_command("train", *SMALL_MOE, "parallel.ep=3", f"save={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    assert "parallel.ep=3 does not divide model.num_moe_experts=8; allowed parallel.ep: [1, 2, 4, 8]" in proc.stderr
    assert not (tmp_path / "run").exists()
