"""Bad input fails fast: one clear message naming the setting, non-zero exit, nothing written."""

import pytest

from tests.commands import SMALL, run_command


def _fails(stage, *overrides, expect):
    proc = run_command(stage, *overrides, check=False, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert expect in proc.stderr, proc.stderr[-3000:]
    return proc


def test_missing_data_prefix(tmp_path):
    (tmp_path / "tok.model").write_bytes(b"")  # exists; the missing prefix is the problem
    _fails("train", *SMALL, "data=custom", f"data.train_prefixes=[{tmp_path}/nope]",
           f"data.tokenizer_model={tmp_path}/tok.model", f"save={tmp_path / 'run'}",
           expect="data.train_prefixes")
    assert not (tmp_path / "run").exists()


def test_tokenizer_does_not_fit_model(tmp_path):
    _fails("train", *SMALL, "model.vocab_size=100", f"save={tmp_path / 'run'}", expect="model.vocab_size=100")
    assert not (tmp_path / "run").exists()


def test_tp_that_does_not_divide_heads(tmp_path):
    proc = _fails("train", *SMALL, "parallel.tp=3", f"save={tmp_path / 'run'}",
                  expect="parallel.tp=3 does not divide model.num_attention_heads=4")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1
    assert not (tmp_path / "run").exists()


def test_unknown_override(tmp_path):
    _fails("train", *SMALL, "train.stepz=3", f"save={tmp_path / 'run'}", expect="stepz")


def test_missing_run_dir_for_evaluate(tmp_path):
    _fails("evaluate", f"load={tmp_path / 'nothing'}", "device=cpu", expect=f"load={tmp_path / 'nothing'}")


@pytest.mark.parametrize("bad", ["device=tpu", "train.global_batch_size=6"])
def test_invalid_values(tmp_path, bad):
    _fails("train", *SMALL, bad, f"save={tmp_path / 'run'}", expect=bad.split("=")[0])


def test_run_checks_search_and_baseline_settings_before_the_teacher(tmp_path):
    """Catches `run` training a teacher for minutes before rejecting a setting that needs no
    teacher: a target set by hand (the search sets it) and a from-scratch warm-up as long as
    the baseline's training, reported together, exit 2, nothing written."""
    proc = _fails("run", "recipe=quick", "device=cpu", "prune.target.hidden_size=64", "scratch.optim.warmup_steps=30",
                  f"save={tmp_path / 'recipe'}", expect="unset prune.target.hidden_size")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1
    assert "scratch.optim.warmup_steps=30 must be below distill.steps=30" in proc.stderr
    assert not (tmp_path / "recipe").exists()


def test_run_with_an_imported_teacher_refuses_bad_recipe_settings_before_the_import(tmp_path):
    """Catches `run` importing (or training) a teacher before rejecting settings that need none:
    a load= it would ignore, an extra budget equal to the main one, an empty prompt; one message,
    exit 2, nothing written."""
    proc = _fails("run", "recipe=smollm2-quick", "device=cpu", f"load={tmp_path}", "extra_budgets=[0.5]",
                  "generate.prompts=['']", f"save={tmp_path / 'recipe'}", expect="load=")
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1
    assert "extra_budgets: 0.5 must be > 0 and differ from search.param_budget=0.5" in proc.stderr
    assert "generate.prompts: every prompt must be a non-empty string" in proc.stderr
    assert not (tmp_path / "recipe").exists()
