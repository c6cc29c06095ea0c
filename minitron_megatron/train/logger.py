"""Progress (bar or log lines), per-step JSONL log, TensorBoard and (offline) wandb, on rank 0 only."""

import json
import os
import warnings
from pathlib import Path

from tqdm import tqdm

from minitron_megatron.checkpoint.run_dir import atomic_write_text
from minitron_megatron.config.train import TrainConfig
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.faults import fault_point
from minitron_megatron.runtime.progress import Progress

TRAIN_LOG = "train_log.jsonl"


class TrainLogger:
    """Rank-0 sink for step and eval metrics.

    `train_log.jsonl` holds one line per step; on resume, lines past the resumed
    step (written after the last checkpoint) are dropped so the log matches the run.
    Each line is appended with one `write` on an O_APPEND descriptor, so it lands
    whole; a line torn by an older crash is dropped on resume, with a warning.
    Use as a context manager: the bar and the TensorBoard/wandb writers close on exit.
    """

    def __init__(self, run_dir, ctx: ParallelContext, cfg: TrainConfig, start_step: int = 0, prefix: str = "train"):
        self.active = ctx.is_main
        self.cfg, self.prefix = cfg, prefix
        if not self.active:
            return
        self.path = Path(run_dir) / TRAIN_LOG
        self._truncate(start_step)
        self.progress = Progress(prefix, cfg.steps, unit="step", initial=start_step)
        self.tb = self._tensorboard(run_dir) if cfg.tensorboard else None
        self.wandb = self._wandb(run_dir) if cfg.wandb else None

    def _truncate(self, start_step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{self.path}:{number}: dropping a torn log line (left by an earlier crash)")
                continue
            if record.get("step", 0) <= start_step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    @staticmethod
    def _tensorboard(run_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    @staticmethod
    def _wandb(run_dir):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        return wandb.init(dir=str(run_dir), project="minitron-megatron", name=Path(run_dir).name)

    def _append(self, line: str) -> None:
        data = line.encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fault_point("log.append", before_exit=lambda: os.write(fd, data[: len(data) // 2]))
            os.write(fd, data)
        finally:
            os.close(fd)

    def _emit(self, step: int, metrics: dict, kind: str) -> None:
        self._append(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        scalars = {f"{self.prefix}/{kind}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)

    def log_step(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self._emit(step, metrics, "step")
        if step % self.cfg.log_interval == 0:
            self.progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
        self.progress.update(1)

    def log_eval(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self._emit(step, metrics, "eval")
        tqdm.write(f"step {step}: val_loss {metrics['val_loss']:.4f} ppl {metrics['ppl']:.2f}")

    def __enter__(self) -> "TrainLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self.active:
            return
        self.progress.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
