"""benchmarks/gpu_check.sh's dry run (it checks its inputs and prints its plan) and the device of
kd_step's collectives, without a GPU."""

import importlib.util
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from minitron_megatron.runtime import destroy_runtime, init_runtime
from minitron_megatron.runtime.device_guard import CollectiveDeviceError, collectives_on
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


def test_kd_step_reduces_its_peaks_on_the_runs_device():
    """Catches a collective handed a tensor on torch's default device rather than the run's:
    kd_step.py built its memory peaks without device=, so on CUDA (where the default group is
    NCCL) every rank raised after the timings and rank 0 never wrote --out. On CPU the run's
    device is the default device and gloo takes the tensor, so the test moves torch's default
    device to meta, as a GPU machine's default (CPU) differs from its run's device (CUDA), and
    lets the guard refuse what NCCL refuses."""
    spec = importlib.util.spec_from_file_location("benchmarks_kd_step", ROOT / "benchmarks" / "kd_step.py")
    kd_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kd_step)
    original = dist.all_reduce
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=1)  # as kd_step's worker starts
    times = {name: [3.0, 1.0, 2.0] for name in kd_step.PARTS}
    peaks = {name: 1000.0 * (i + 1) for i, name in enumerate(kd_step.PARTS)}
    try:
        with torch.device("meta"), collectives_on(ctx.device):
            with pytest.raises(CollectiveDeviceError, match="tensor on meta"):
                dist.all_reduce(torch.tensor([1.0], dtype=torch.float64))  # the old kd_step.py:208
            result = kd_step.gather_result(times, peaks, ctx)
    finally:
        destroy_runtime()
    assert result["kd"] == {"seconds": 2.0, "all_seconds": [3.0, 1.0, 2.0], "peak_bytes": 3000}
    assert dist.all_reduce is original  # the guard is gone with its block


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(folder, name: str, version: str, tags: str = "py3-none-any"):
    path = folder / f"{name.replace('-', '_')}-{version}-{tags}.whl"
    path.write_bytes(b"")
    return path


def test_megatron_core_wheel_is_the_python312_pin():
    """Catches the GPU check bringing another megatron-core than the one the Python 3.12 tier
    is tested with: the wheel list must take the version requirements/cpu.txt pins."""
    pins = re.findall(r'^megatron-core==(\S+); python_version >= "3.12"$', (ROOT / "requirements/cpu.txt").read_text(),
                      flags=re.M)
    listed = subprocess.run([sys.executable, "benchmarks/gpu_wheels.py", "--list"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    assert len(pins) == 1 and f"megatron-core=={pins[0]}" in listed, (pins, listed)
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime"} <= {line.split("==")[0] for line in listed}


def test_a_wheel_for_another_python_is_refused(tmp_path):
    gpu_wheels = _bench("gpu_wheels")
    for name, (version, _) in gpu_wheels.required().items():
        _wheel(tmp_path, name, version, "cp311-cp311-manylinux_2_28_x86_64" if name == "megatron-core" else "py3-none-any")
    version = gpu_wheels.required()["megatron-core"][0]
    files, problems = gpu_wheels.check(tmp_path)
    assert not files and problems == [f"--wheels {tmp_path}: megatron_core-{version}-cp311-cp311-manylinux_2_28_x86_64"
                                      ".whl does not install on CPython 3.12 x86-64 Linux"]
