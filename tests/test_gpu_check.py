"""benchmarks/gpu_check.sh's dry run: it checks its inputs and prints its plan (no GPU needed)."""

import subprocess

from tests.commands import ROOT

NEEDED = ["megatron_core-0.16.1", "hydra_core-1.3.2", "omegaconf-2.3.0", "antlr4_python3_runtime-4.9.3",
          "sentencepiece-0.2.0", "safetensors-0.5.0", "tqdm-4.67.0", "psutil-7.0.0", "einops-0.8.0"]


def _dry_run(wheels):
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--wheels", str(wheels)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_every_step_when_the_wheels_are_there(tmp_path):
    """Catches a GPU check that would fail on the GPU machine for a reason visible here (a
    missing script, a broken benchmark argument parser), wasting the GPU call."""
    for name in NEEDED:
        (tmp_path / f"{name}-py3-none-any.whl").write_bytes(b"")
    proc = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert any("pytest -q -m gpu" in line for line in plan) and any("gpu_bench.py" in line for line in plan)
    assert any("kd_step.py" in line and "--device cuda" in line for line in plan)
    assert any("minitron_megatron.distill" in line and "device=cuda" in line for line in plan)
    assert "dry run: inputs ok" in proc.stdout


def test_missing_or_duplicate_wheels_are_named(tmp_path):
    for name in NEEDED[1:]:
        (tmp_path / f"{name}-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "tqdm-4.66.0-py3-none-any.whl").write_bytes(b"")
    proc = _dry_run(tmp_path)
    assert proc.returncode == 2
    assert "no megatron_core-*.whl" in proc.stderr and "2 versions of tqdm" in proc.stderr, proc.stderr
