"""Run settings against the loaded model: `seq_length` is the run's (the model keeps its
max_position_embeddings), `model.*` keys given with `load=` are applied or refused (never
silently ignored), and a command logging to a file (stderr not a terminal) shows progress."""

import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.model import LOAD_SETTINGS, ModelConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.runtime import progress as P
from tests.commands import SMALL, run_command, summary

FIXTURE = Path(__file__).parent / "fixtures" / "cross_version" / "mcore-0.16.1"
EVALUATE = ["device=cpu", "evaluate.samples=8", "evaluate.micro_batch_size=4"]


@pytest.fixture(scope="module")
def short_evaluate(small_teacher):
    """`evaluate` of the teacher (made at seq_length=64) at seq_length=32, progress shown,
    stderr a pipe as in a batch job's log."""
    return run_command("evaluate", f"load={small_teacher}", "seq_length=32", *EVALUATE,
                       env={P.NO_PROGRESS_ENV: "0"})


def test_evaluate_runs_at_a_shorter_seq_length_than_the_run_dirs(short_evaluate, small_teacher):
    """Catches seq_length being a model property again: the run dir records 64, and the
    evaluation must score 8 samples of 32 tokens, not 64."""
    assert rd.recorded_seq_length(small_teacher) == 64
    out = summary(short_evaluate)
    assert out["seq_length"] == 32 and out["tokens"] == 8 * 32, out


def test_progress_lines_with_rate_and_eta_when_stderr_is_not_a_terminal(short_evaluate):
    """Catches a long stage that prints nothing in a log file (a tqdm bar only on terminals):
    evaluation ends with a plain line carrying its count, rate and ETA."""
    lines = [line for line in short_evaluate.stderr.splitlines() if line.startswith("[evaluate]")]
    assert lines and re.fullmatch(r"\[evaluate\] 2/2 \(100%\)  .* microbatch/s  elapsed \d+:\d\d  ETA 0:00",
                                  lines[-1]), short_evaluate.stderr[-2000:]


def test_seq_length_past_the_position_limit_is_refused_naming_both(small_teacher):
    proc = run_command("evaluate", f"load={small_teacher}", "seq_length=512", *EVALUATE, check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-2000:]
    assert "seq_length=512" in proc.stderr and "max_position_embeddings=256" in proc.stderr, proc.stderr


def test_architecture_overrides_with_load_are_refused_in_one_message(small_teacher):
    """Catches `model.*` given with load= being silently ignored (the run dir's model.yaml wins):
    every offending key is named once, with what is allowed, exit 2."""
    proc = run_command("evaluate", f"load={small_teacher}", "model.num_layers=2", "model.hidden_size=32",
                       *EVALUATE, check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-2000:]
    assert "model.num_layers=2 (the run's: 4)" in proc.stderr and "model.hidden_size=32" in proc.stderr
    assert "model.hidden_dropout" in proc.stderr  # what is allowed


def test_run_settings_with_load_take_effect(small_teacher, tmp_path):
    """Catches an applicable `model.*` key (dropout) or `seq_length` dropped on `train load=`:
    both reach the new run dir (and the tokens it trained on), the architecture stays the run's.
    SMALL's own model.* keys equal the run's, so they are accepted as they are."""
    save = tmp_path / "tuned"
    args = [a for a in SMALL if not a.startswith("seq_length=")]
    out = summary(run_command("train", *args, f"load={small_teacher}", "seq_length=32", "model.hidden_dropout=0.1",
                              "train.steps=1", "train.eval_interval=1", f"save={save}"))
    body = yaml.safe_load((save / rd.MODEL_YAML).read_text())
    assert body["model"]["hidden_dropout"] == 0.1 and body["seq_length"] == 32
    assert body["model"]["max_position_embeddings"] == 256 and body["model"]["num_layers"] == 4
    assert out["seq_length"] == 32 and out["tokens_seen"] == 8 * 32, out


def test_loaded_model_config_applies_run_settings_and_refuses_the_rest():
    """The rule in one place: LOAD_SETTINGS apply; other keys are refused when they differ
    from the run's (equal values and None, "derive it", are not a conflict)."""
    run = ModelConfig(num_layers=4, vocab_size=512, params_dtype="float32")
    given = replace(run, params_dtype="bfloat16", attention_dropout=0.2, vocab_size=None, num_layers=4)
    loaded = rd.loaded_model_config(run, given, ["params_dtype", "attention_dropout", "vocab_size", "num_layers"],
                                    "load=x")
    assert (loaded.params_dtype, loaded.attention_dropout, loaded.vocab_size) == ("bfloat16", 0.2, 512)
    with pytest.raises(ConfigError) as err:
        rd.loaded_model_config(run, replace(given, num_layers=2, rotary_base=5, hidden_dropout=0.5),
                               ["num_layers", "rotary_base", "hidden_dropout"], "load=x")
    assert len(err.value.problems) == 1 and "model.num_layers=2" in str(err) and "model.rotary_base=5" in str(err)
    assert "hidden_dropout=0.5" not in str(err)
    assert set(LOAD_SETTINGS) <= {f for f in ModelConfig.__dataclass_fields__}


def test_run_dirs_written_before_the_split_still_load():
    """model.yaml files of earlier versions have model.seq_length (limit and run length in one):
    both must come back from it (tests/fixtures are such files, and must not be rewritten)."""
    assert "seq_length" in yaml.safe_load((FIXTURE / rd.MODEL_YAML).read_text())["model"]
    cfg, _, _ = rd.read_model_yaml(FIXTURE)
    assert cfg.max_position_embeddings == 64 and rd.recorded_seq_length(FIXTURE) == 64


def test_command_line_model_keys_and_renamed_keys():
    """Which `model` fields a command line gives (a preset: its architecture keys), and old keys
    named with their replacement instead of Hydra's "not in struct"."""
    from minitron_megatron.cli.app import _renamed_keys, model_keys_given

    assert model_keys_given(["model.hidden_dropout=0.1", "seq_length=3", "++model.name=x", "load=r"]) == [
        "hidden_dropout", "name"]
    preset = model_keys_given(["model=tiny"])  # the preset's architecture; its run settings are defaults
    assert "num_layers" in preset and not set(preset) & set(LOAD_SETTINGS)
    assert "seq_length= is now" in _renamed_keys(["model.seq_length=64"])[0]
    assert _renamed_keys(["seq_length=64", "model.max_position_embeddings=64"]) == []
