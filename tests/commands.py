"""Run our commands as a user would (python -m / torchrun) and read their JSON summaries."""

import json
import os
import subprocess
import sys
from pathlib import Path

from minitron_megatron.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]

# A small variant of the tiny preset so multi-process tests take seconds per step.
SMALL = [
    "model=tiny", "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=192",
    "model.kv_channels=16", "seq_length=64",
    "train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_samples=16",
    "train.log_interval=1", "train.optim.warmup_steps=2", "device=cpu",
    "evaluate.samples=16", "evaluate.micro_batch_size=4",  # the summary's val_loss, as `evaluate` measures it
]


def command_line(stage: str, *overrides: str, nproc: int = 1) -> list:
    """`python -m minitron_megatron.<stage> ...`, under torchrun when nproc > 1."""
    if nproc == 1:
        cmd = [sys.executable, "-m", f"minitron_megatron.{stage}", *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", f"minitron_megatron.{stage}", *overrides]
    return cmd


# tiny-moe as it ships (8 experts, top-2), on 2 layers and shorter samples.
SMALL_MOE = ["model=tiny-moe", "model.num_layers=2", "seq_length=64", "device=cpu", "data=stdlib",
             "train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_samples=8",
             "train.optim.warmup_steps=1", "evaluate.samples=16", "evaluate.micro_batch_size=4"]

LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def command_env(extra: dict = None) -> dict:
    """This environment for a command, without any launcher variables a test left behind."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "MINITRON_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT), **(extra or {})}


def run_command(stage: str, *overrides: str, nproc: int = 1, check: bool = True, timeout: int = 600,
                env: dict = None):
    """Run `python -m minitron_megatron.<stage>` (torchrun when nproc > 1); `env` adds variables."""
    cmd = command_line(stage, *overrides, nproc=nproc)
    proc = subprocess.run(cmd, cwd=ROOT, env=command_env(env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def summary(proc) -> dict:
    """The JSON summary: the last stdout line."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_losses(run_dir) -> dict:
    lines = (Path(run_dir) / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "step"}
