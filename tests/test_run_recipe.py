"""`python -m minitron_megatron.run recipe=quick`: the whole recipe end to end, as CI's smoke run."""

from tests.commands import run_command, summary


def test_quick_recipe_end_to_end_and_rerun_reuses(tmp_path):
    """Catches any stage hand-off breaking (teacher -> importance -> trim -> distill ->
    evaluate) and a rerun that redoes finished stages instead of reusing them."""
    save = tmp_path / "recipe"
    first = summary(run_command("run", "recipe=quick", f"save={save}", "device=cpu", timeout=900))
    assert set(first) == {"teacher", "pruned", "student"}
    teacher, pruned, student = first["teacher"], first["pruned"], first["student"]
    assert 0.4 < pruned["params"] / teacher["params"] < 0.6
    assert student["params"] == pruned["params"]
    assert teacher["val_loss"] < pruned["val_loss"]
    assert student["val_loss"] < pruned["val_loss"]  # distillation recovers part of the loss
    again = summary(run_command("run", "recipe=quick", f"save={save}", "device=cpu"))
    assert all(stage["reused"] for stage in again.values())
    assert {k: v["val_loss"] for k, v in again.items()} == {k: v["val_loss"] for k, v in first.items()}
