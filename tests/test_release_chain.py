"""The commands chained as a user runs them, at TP/PP > 1, on whichever megatron-core this
interpreter has: written for the compatibility tier (Python 3.12, megatron-core 0.19.2), where no
other test chains every command. train at TP=2 -> evaluate at TP=1 and PP=2 -> prune at TP=2
and TP=1 -> distill at PP=1 and PP=2 -> convert to Hugging Face, loaded by transformers."""

import math

import pytest

from tests.commands import SMALL, run_command, step_losses, summary

pytestmark = [pytest.mark.compat, pytest.mark.slow]

EVALUATE = ["device=cpu", "evaluate.samples=16", "evaluate.micro_batch_size=4"]
PRUNE = ["prune.target.hidden_size=48", "prune.target.ffn_hidden_size=128",
         "prune.importance.calibration_samples=16", "prune.importance.depth_samples=16", *EVALUATE]
DISTILL = ["distill.steps=3", "distill.micro_batch_size=4", "distill.global_batch_size=8",
           "distill.eval_samples=16", "distill.log_interval=1", "distill.optim.warmup_steps=1", *EVALUATE]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    run_command("train", *SMALL, "train.steps=3", "train.eval_interval=3", "parallel.tp=2",
                f"save={root / 'teacher'}", nproc=2)
    return root


def test_evaluate_a_tp2_run_dir_at_tp1_and_pp2(chain):
    """Catches a checkpoint this release writes at TP=2 that reads back differently at another
    layout (dist_checkpointing's resharding, the common state's new home in 0.17+)."""
    tp1 = summary(run_command("evaluate", f"load={chain / 'teacher'}", *EVALUATE))
    pp2 = summary(run_command("evaluate", f"load={chain / 'teacher'}", *EVALUATE, "parallel.pp=2", nproc=2))
    assert math.isfinite(tp1["val_loss"])
    assert pp2["val_loss"] == pytest.approx(tp1["val_loss"], rel=1e-6)


def test_prune_at_tp2_equals_tp1_then_distill_at_pp2_equals_pp1_then_export(chain):
    """Catches this release's layers trimmed differently when sharded (partition attributes,
    cached partition sizes), its pipeline schedule changing the KD curve, and an export
    transformers cannot load."""
    teacher = chain / "teacher"
    tp1 = summary(run_command("prune", f"load={teacher}", *PRUNE, f"save={chain / 'pruned1'}"))
    tp2 = summary(run_command("prune", f"load={teacher}", *PRUNE, "parallel.tp=2", f"save={chain / 'pruned2'}",
                              nproc=2))
    assert tp2["params_after"] == tp1["params_after"] < tp1["params_before"]
    assert tp2["val_loss"] == pytest.approx(tp1["val_loss"], rel=1e-5)

    pair = [f"teacher.load={teacher}", f"student.load={chain / 'pruned2'}"]
    pp1 = summary(run_command("distill", *pair, *DISTILL, f"save={chain / 'student1'}"))
    pp2 = summary(run_command("distill", *pair, *DISTILL, "parallel.pp=2", f"save={chain / 'student2'}", nproc=2))
    curve1, curve2 = step_losses(chain / "student1"), step_losses(chain / "student2")
    assert sorted(curve1) == sorted(curve2) == [1, 2, 3]
    assert all(curve2[s] == pytest.approx(curve1[s], rel=1e-5) for s in curve1), (curve1, curve2)
    assert pp2["val_loss"] == pytest.approx(pp1["val_loss"], rel=1e-5)

    out = chain / "hf"
    run_command("convert", f"load={chain / 'student2'}", f"to_hf={out}", "device=cpu")
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.hidden_size == 48 and model.config.intermediate_size == 128
