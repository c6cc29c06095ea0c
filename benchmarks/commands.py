"""The benchmarks' way to run one of our commands as a user would: `python -m
minitron_megatron.<module> key=value ...` in a fresh process from this checkout, its
progress bars off, its JSON summary (the last stdout line) returned."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start(module: str, *overrides: str) -> subprocess.Popen:
    """Start the command (printed first); `summary` waits for it."""
    env = {**os.environ, "MINITRON_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", f"minitron_megatron.{module}", *overrides]
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def summary(proc: subprocess.Popen, what: str) -> dict:
    """The JSON summary of a started command; exits with its output tails if it failed."""
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def run(module: str, *overrides: str) -> dict:
    """Run the command to its end; its JSON summary."""
    return summary(start(module, *overrides), module)
