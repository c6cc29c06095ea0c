"""The built wheel works outside the checkout: the YAMLs in conf/ ship as package data."""

import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.commands import ROOT


def _run(cmd, cwd, **kw):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_wheel_in_a_fresh_venv_composes_every_command_outside_the_checkout(tmp_path):
    """Catches YAMLs left out of the wheel (conf/ lives outside the package in the repo),
    a config path that only resolves inside a checkout, and broken console scripts.

    The fresh venv gets the wheel itself with pip, and reaches the already-installed
    dependencies (torch, Megatron-core, Hydra, ...) through a .pth line naming this
    interpreter's site-packages, whose own .pth files (this checkout's editable
    install) are not processed: so `minitron_megatron` can only come from the wheel."""
    wheels, venv, elsewhere = tmp_path / "wheels", tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT],
         cwd=tmp_path)
    wheel = next(wheels.glob("minitron_megatron-*.whl"))
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=elsewhere).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
         cwd=tmp_path)

    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    where = _run([python, "-c", "import minitron_megatron; print(minitron_megatron.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout
    job = _run([python, "-m", "minitron_megatron.train", "--cfg", "job", "model=llama3.1-8b"], cwd=elsewhere, env=env)
    assert "train:" in job.stdout and "hidden_size: 4096" in job.stdout, job.stdout[-2000:]
    for name in ("evaluate", "prune", "distill", "run", "convert", "search"):  # console scripts, own YAMLs
        out = _run([venv / "bin" / f"minitron-{name}", "--cfg", "job"], cwd=elsewhere, env=env).stdout
        assert "model:" in out and "data:" in out, (name, out[-2000:])
