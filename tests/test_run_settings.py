"""Run settings against the loaded model: `seq_length` is the run's (the model keeps its
max_position_embeddings), and a command logging to a file (stderr not a terminal) shows progress."""

import re
from pathlib import Path

import pytest
import yaml

from minitron_megatron.checkpoint import run_dir as rd
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


def test_seq_length_past_the_position_limit_is_refused_naming_both(small_teacher, tmp_path):
    proc = run_command("evaluate", f"load={small_teacher}", "seq_length=512", *EVALUATE, check=False)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-2000:]
    assert "seq_length=512" in proc.stderr and "max_position_embeddings=256" in proc.stderr, proc.stderr


def test_run_settings_with_load_take_effect(small_teacher, tmp_path):
    """Catches `seq_length` dropped on `train load=`: it reaches the new run dir (and the tokens
    it trained on), the model's limit and architecture stay the run's."""
    save = tmp_path / "tuned"
    args = [a for a in SMALL if not a.startswith("seq_length=")]
    out = summary(run_command("train", *args, f"load={small_teacher}", "seq_length=32",
                              "train.steps=1", "train.eval_interval=1", f"save={save}"))
    body = yaml.safe_load((save / rd.MODEL_YAML).read_text())
    assert body["seq_length"] == 32
    assert body["model"]["max_position_embeddings"] == 256 and body["model"]["num_layers"] == 4
    assert out["seq_length"] == 32 and out["tokens_seen"] == 8 * 32, out


def test_run_dirs_written_before_the_split_still_load():
    """model.yaml files of earlier versions have model.seq_length (limit and run length in one):
    both must come back from it (tests/fixtures are such files, and must not be rewritten)."""
    assert "seq_length" in yaml.safe_load((FIXTURE / rd.MODEL_YAML).read_text())["model"]
    cfg, _, _ = rd.read_model_yaml(FIXTURE)
    assert cfg.max_position_embeddings == 64 and rd.recorded_seq_length(FIXTURE) == 64


def test_renamed_keys():
    """Old keys named with their replacement instead of Hydra's "not in struct"."""
    from minitron_megatron.cli.app import _renamed_keys

    assert "seq_length= is now" in _renamed_keys(["model.seq_length=64"])[0]
    assert _renamed_keys(["seq_length=64", "model.max_position_embeddings=64"]) == []
