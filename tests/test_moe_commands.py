"""The `tiny-moe` preset through the commands, as a user runs them: train, evaluate the run dir,
score it at EP=2 under torchrun; a bad EP size fails before any work."""

import pytest
import torch

from tests.commands import SMALL_MOE, run_command, summary

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = [pytest.mark.compat, pytest.mark.slow]


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


TRIM = ["prune.stage=trim", "prune.target.num_moe_experts=4", "prune.target.moe_ffn_hidden_size=64",
        "prune.target.hidden_size=96", "evaluate.samples=16", "evaluate.micro_batch_size=4"]


@pytest.fixture(scope="module")
def pruned(trained, scored, tmp_path_factory):
    """The trained tiny-moe trimmed at EP=1: 8 -> 4 experts, expert width 128 -> 64, hidden 128 -> 96."""
    run_dir, _ = trained
    save = tmp_path_factory.mktemp("moe_pruned") / "ep1"
    out = summary(run_command("prune", f"load={run_dir}", "device=cpu", "data=stdlib", f"prune.scores={scored}",
                              *TRIM, f"save={save}"))
    return save, out


def test_trim_tiny_moe_at_ep2_equals_ep1(trained, scored, pruned, tmp_path):
    """Catches a trim whose result depends on the EP layout (experts exchanged between EP ranks,
    router rows, per-expert neurons): the same target from the same scores at EP=1 and EP=2 gives
    the same zero-shot validation loss, and the EP=2 run dir loads back at EP=1 with that loss."""
    import json

    run_dir, _ = trained
    _, one = pruned
    two = summary(run_command("prune", f"load={run_dir}", "device=cpu", "data=stdlib", f"prune.scores={scored}",
                              *TRIM, "parallel.ep=2", f"save={tmp_path / 'ep2'}", nproc=2))
    assert two["params_after"] == one["params_after"] < one["params_before"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    plan = json.loads((tmp_path / "ep2" / "trim_plan.json").read_text())
    assert [len(kept) for kept in plan["experts"]] == [4, 4] and plan["notes"]["expert_metric"] == "contribution"
    back = summary(run_command("evaluate", f"load={tmp_path / 'ep2'}", "device=cpu", "data=stdlib",
                               "evaluate.samples=16", "evaluate.micro_batch_size=4"))
    assert back["params"] == one["params_after"]
    assert back["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)


def test_distill_pruned_moe_at_ep2_follows_ep1_and_logs_its_aux_and_router_losses(trained, pruned, tmp_path):
    """Catches a MoE distillation that depends on the EP layout (teacher and student experts
    split over EP, the student's expert gradients reduced over the wrong replicas), or one whose
    load-balancing loss is dropped from the objective or not logged, or a router-logit loss that
    depends on the EP layout or is left out of the optimised total: 3 KD steps of the pruned
    student from the 8-expert teacher at EP=1 and EP=2 give the same KD, aux and router losses
    every step (rel 1e-4) and the same final val loss; the total is kd + weight * router; the
    aux-loss weight is the run's (model.moe_aux_loss_coeff with student.load), and with weight 0
    there is none to log."""
    import json

    def steps(run_dir):
        lines = (run_dir / "train_log.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "step"]

    teacher, _ = trained
    student, _ = pruned
    common = [f"teacher.load={teacher}", f"student.load={student}", "device=cpu", "data=stdlib", "seq_length=64",
              "distill.steps=3", "distill.micro_batch_size=2", "distill.global_batch_size=4", "distill.eval_interval=3",
              "distill.eval_samples=8", "distill.log_interval=1", "distill.optim.warmup_steps=0",
              "model.moe_aux_loss_coeff=0.05", "distill.router_loss_weight=0.5", "evaluate.samples=8",
              "evaluate.micro_batch_size=2"]
    one = summary(run_command("distill", *common, f"save={tmp_path / 'ep1'}"))
    two = summary(run_command("distill", *common, "parallel.ep=2", f"save={tmp_path / 'ep2'}", nproc=2))
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    logs = [steps(tmp_path / run) for run in ("ep1", "ep2")]
    for name in ("kd_loss", "moe_load_balancing_loss", "router_loss"):
        ours, theirs = ([step[name] for step in log] for log in logs)
        assert len(ours) == 3 and all(v > 0 for v in ours), (name, ours)
        assert theirs == pytest.approx(ours, rel=1e-4), name
    for step in logs[0]:  # the router loss is in what the student optimises
        assert step["loss"] == pytest.approx(step["kd_loss"] + 0.5 * step["router_loss"], rel=1e-5)
    assert one["router_loss"] > 0
    off = [key for key in common if not key.startswith("model.moe_aux_loss_coeff")]
    summary(run_command("distill", *off, "model.moe_aux_loss_coeff=0", "distill.steps=1",
                        f"save={tmp_path / 'off'}"))
    assert all("moe_load_balancing_loss" not in step for step in steps(tmp_path / "off"))


def test_a_dense_student_distils_from_a_moe_teacher(trained, small_teacher, tmp_path):
    """Catches a MoE teacher that only works with a MoE student: the session's dense tiny run
    dir (same stdlib tokenizer) distils from the trained tiny-moe: the KD loss is logged and
    finite, and the frozen teacher's router losses, which train nothing, are not in the
    student's log. (parallel.ep > 1 with a dense student is refused: EP needs a MoE student.)"""
    import json
    import math

    teacher, _ = trained
    out = summary(run_command("distill", f"teacher.load={teacher}", f"student.load={small_teacher}", "device=cpu",
                              "data=stdlib", "seq_length=64", "distill.steps=2",
                              "distill.micro_batch_size=2", "distill.global_batch_size=4", "distill.eval_interval=2",
                              "distill.eval_samples=4", "distill.log_interval=1", "evaluate.samples=4",
                              "evaluate.micro_batch_size=2", f"save={tmp_path / 'dense'}"))
    assert math.isfinite(out["val_loss"]) and out["kd_loss"] > 0
    steps = [json.loads(line) for line in (tmp_path / "dense" / "train_log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "step"]
    assert len(steps) == 2 and all(math.isfinite(s["kd_loss"]) for s in steps)
    assert all("moe_load_balancing_loss" not in s for s in steps)


def test_expert_parallel_size_that_does_not_divide_the_experts(tmp_path):
    """Catches an EP size that reaches Megatron's build-time assert (or a hang in its groups):
    exit 2, one error naming parallel.ep and the sizes that work, nothing written."""
    proc = run_command("train", *SMALL_MOE, "parallel.ep=3", f"save={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-3000:]
    assert "parallel.ep=3 does not divide model.num_moe_experts=8; allowed parallel.ep: [1, 2, 4, 8]" in proc.stderr
    assert not (tmp_path / "run").exists()
