"""benchmarks/gpu_check.sh without a GPU: its input checks, its dry run's plan, its runner's
status table on a tiny plan, and the device of kd_step's collectives."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from minitron_megatron.runtime import destroy_runtime, init_runtime
from minitron_megatron.runtime.device_guard import CollectiveDeviceError, collectives_on
from tests.commands import ROOT

REAL_STEPS = ["install", "gpu_tests", "gpu_bench", "kd_step", "train", "prune", "distill"]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_wheels = _bench("gpu_wheels")


def _wheel(folder, name: str, version: str, tags: str = "py3-none-any"):
    path = folder / f"{name.replace('-', '_')}-{version}-{tags}.whl"
    path.write_bytes(b"")
    return path


def _wheelhouse(folder):
    """Empty stand-ins for the wheels of benchmarks/gpu_wheels.txt, at the versions it resolves."""
    return [_wheel(folder, name, version, "cp312-cp312-manylinux_2_28_x86_64" if name == "megatron-core" else
                   "py3-none-any") for name, (version, _) in gpu_wheels.required().items()]


def _check(*args, cwd=ROOT):
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--python", sys.executable, *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_megatron_core_wheel_is_the_python312_pin():
    """Catches the GPU check bringing another megatron-core than the one the Python 3.12 tier
    is tested with: the wheel list must take the version requirements/cpu.txt pins."""
    pins = re.findall(r'^megatron-core==(\S+); python_version >= "3.12"$', (ROOT / "requirements/cpu.txt").read_text(),
                      flags=re.M)
    listed = subprocess.run([sys.executable, "benchmarks/gpu_wheels.py", "--list"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    assert len(pins) == 1 and f"megatron-core=={pins[0]}" in listed, (pins, listed)
    assert {"hydra-core", "omegaconf", "antlr4-python3-runtime"} <= {line.split("==")[0] for line in listed}


def test_dry_run_prints_every_step_when_the_wheels_are_there(tmp_path):
    """Catches a GPU check that would fail on the GPU machine for a reason visible here (a
    missing script, a benchmark's argument parser refusing the plan's arguments), wasting the GPU call."""
    (tmp_path / "whl").mkdir()
    wheels = _wheelhouse(tmp_path / "whl")
    proc = _check("--dry-run", "--wheels", tmp_path / "whl", "--status", tmp_path / "status.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.findall(r"^=== (\S+)$", proc.stdout, flags=re.M) == REAL_STEPS
    plan = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    install = next(line for line in plan if "pip install" in line)
    assert "--no-index" in install and all(str(w) in install for w in wheels)
    assert any("pytest -q -m gpu" in line and "tests/distill/test_kd_loss.py" in line for line in plan)
    assert any("benchmarks/gpu_bench.py" in line for line in plan)
    assert any("benchmarks/kd_step.py" in line and "--device cuda" in line for line in plan)
    for stage in ("train", "prune", "distill"):
        assert any(f"minitron_megatron.{stage} " in line and "device=cuda" in line for line in plan), stage
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["dry_run"] and [s["step"] for s in status["steps"]] == REAL_STEPS
    assert "dry run: inputs ok, 7 steps" in proc.stdout


def test_missing_wrong_or_duplicate_wheels_are_named(tmp_path):
    """Catches a wheel folder that would break the GPU run (a package missing, megatron-core
    0.16.1 which does not install on the machine's Python 3.12 tier, two versions of one
    package installed in an order nobody chose): each named, exit 2, nothing run."""
    need = {name: version for name, (version, _) in gpu_wheels.required().items()}
    _wheel(tmp_path, "megatron-core", "0.16.1", "cp312-cp312-manylinux_2_28_x86_64")
    _wheel(tmp_path, "hydra-core", need["hydra-core"])
    _wheel(tmp_path, "hydra-core", "1.3.2")
    _wheel(tmp_path, "omegaconf", need["omegaconf"])
    proc = _check("--dry-run", "--wheels", tmp_path, "--status", tmp_path / "status.json")
    assert proc.returncode == 2
    assert f"megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl is megatron-core 0.16.1, need " \
           f"{need['megatron-core']} (from requirements/cpu.txt)" in proc.stderr, proc.stderr
    assert "2 wheels of hydra-core (hydra_core-1.3.2-py3-none-any.whl, hydra_core-1.3.8-py3-none-any.whl)" \
           in proc.stderr, proc.stderr
    assert "no antlr4-python3-runtime wheel" in proc.stderr and "omegaconf" not in proc.stderr, proc.stderr
    assert "+ " not in proc.stdout and not (tmp_path / "status.json").exists()


def test_a_wheel_for_another_python_is_refused(tmp_path):
    _wheelhouse(tmp_path)
    version = gpu_wheels.required()["megatron-core"][0]
    for path in tmp_path.glob("megatron_core-*"):
        path.unlink()
    _wheel(tmp_path, "megatron-core", version, "cp311-cp311-manylinux_2_28_x86_64")
    files, problems = gpu_wheels.check(tmp_path)
    assert not files and problems == [f"--wheels {tmp_path}: megatron_core-{version}-cp311-cp311-manylinux_2_28_x86_64"
                                      ".whl does not install on CPython 3.12 x86-64 Linux"]


TINY_PLAN = """
STEPS=(first breaks later after_break slow)
NEEDS[after_break]=breaks
LIMIT[slow]=1
step_first() { run true; }
step_breaks() { run sh -c 'echo boom; exit 3'; run touch "$MARKS/after_the_failing_command"; }
step_later() { run touch "$MARKS/later"; }
step_after_break() { run touch "$MARKS/after_break"; }
step_slow() { run sleep 30; }
"""


def test_every_step_runs_after_a_failure_and_the_table_says_so(tmp_path):
    """Catches a check whose first failure hides every measurement after it (the old runner's
    set -e over eval'ed steps): the real runner, on a tiny plan where one step fails, one
    needs the failed one and one outlives its time limit."""
    (tmp_path / "whl").mkdir()
    _wheelhouse(tmp_path / "whl")
    (tmp_path / "plan.sh").write_text(f"MARKS={tmp_path}\n{TINY_PLAN}")
    proc = _check("--wheels", tmp_path / "whl", "--plan", tmp_path / "plan.sh", "--status", tmp_path / "status.json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = json.loads((tmp_path / "status.json").read_text())
    assert {s["step"]: s["status"] for s in status["steps"]} == {
        "first": "ok", "breaks": "FAILED rc=3", "later": "ok", "after_break": "skipped: needs breaks (FAILED rc=3)",
        "slow": "FAILED rc=124 (timed out at 1 s)"}
    assert not status["ok"] and not status["dry_run"]
    assert (tmp_path / "later").exists()
    assert not (tmp_path / "after_the_failing_command").exists() and not (tmp_path / "after_break").exists()
    assert "boom" in (tmp_path / "gpu_check_logs" / "02-breaks.log").read_text()
    table = proc.stdout[proc.stdout.index("step "):]
    assert re.search(r"^breaks +FAILED rc=3 +\d+\.\d$", table, flags=re.M), table
    assert re.search(r"^later +ok +\d+\.\d$", table, flags=re.M), table

    proc = _check("--wheels", tmp_path / "whl", "--plan", tmp_path / "plan.sh", "--status", tmp_path / "status.json",
                  "--budget", "5")
    spent = "skipped: the --budget of 5 s is spent"
    status = json.loads((tmp_path / "status.json").read_text())
    assert proc.returncode == 1 and {s["step"]: s["status"] for s in status["steps"]} == {
        "first": spent, "breaks": spent, "later": spent, "after_break": f"skipped: needs breaks ({spent})", "slow": spent}


def test_kd_step_reduces_its_peaks_on_the_runs_device():
    """Catches a collective handed a tensor on torch's default device rather than the run's:
    kd_step.py built its memory peaks without device=, so on CUDA (where the default group is
    NCCL) every rank raised after the timings and rank 0 never wrote --out. On CPU the run's
    device is the default device and gloo takes the tensor, so the test moves torch's default
    device to meta, as a GPU machine's default (CPU) differs from its run's device (CUDA), and
    lets the guard refuse what NCCL refuses."""
    kd_step = _bench("kd_step")
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


# ---------------------------------------------------------------- the rehearsal (gpu_check.sh --rehearse)


def test_rehearsal_environment_imports_only_what_the_gpu_machine_has(tmp_path):
    """Catches the first class of fault a rehearsal must find before GPU time is spent: code the
    check runs that imports a package the GPU machine lacks (megatron-core and Hydra come only as
    wheels; gguf not at all). The rehearsal's venv, built from this interpreter, imports the
    machine's packages and fails on the others as the machine would."""
    rehearsal_env = _bench("rehearsal_env")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rehearsal_env.py"), str(tmp_path / "env"),
                           "--without-pip"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    python = proc.stdout.strip().splitlines()[-1]
    assert set(rehearsal_env.wanted()) >= {"torch", "transformers", "pyyaml", "numpy"}

    def imports(module: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)

    assert imports("torch, transformers, yaml, numpy, safetensors").returncode == 0
    for module in ("megatron.core", "hydra", "gguf"):
        proc = imports(module)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, (module, proc.stderr[-500:])


def test_a_rehearsed_run_refuses_collectives_on_tensors_a_gpu_run_holds_on_the_host(monkeypatch):
    """Catches the kd_step.py:208 kind of fault in any command a rehearsal runs: with
    MINITRON_CHECK_COLLECTIVES=1 (gpu_check.sh --rehearse sets it) the runtime checks every
    collective for the rest of its life: a tensor built without device= (and what is computed
    from it alone) is refused on CPU as NCCL refuses it on CUDA; one built with device=ctx.device,
    moved there, or mixed with a device tensor passes; destroy_runtime lifts the check."""
    monkeypatch.setenv("MINITRON_CHECK_COLLECTIVES", "1")
    original = dist.all_reduce
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=1)
    try:
        host = torch.tensor([3.0, 1.0], dtype=torch.float64)  # the old kd_step.py:208 peaks
        for bad in (host, host * 2, host.max().reshape(1), torch.zeros(2), torch.as_tensor(host.numpy()),
                    torch.ones(2, device=ctx.device).cpu()):
            with pytest.raises(CollectiveDeviceError, match="built without device="):
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        on_device = torch.tensor([3.0, 1.0], device=ctx.device)
        for good in (on_device, on_device * torch.tensor(2.0), host.to(ctx.device), host.to(device=ctx.device),
                     torch.zeros(2, device=ctx.device).add_(host)):
            dist.all_reduce(good)
    finally:
        destroy_runtime()
    assert dist.all_reduce is original
