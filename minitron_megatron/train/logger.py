"""Progress bar, per-step JSONL log, TensorBoard and (offline) wandb, on rank 0 only."""

import json
import os
from pathlib import Path

from tqdm import tqdm

from minitron_megatron.config.train import TrainConfig
from minitron_megatron.runtime.context import ParallelContext

TRAIN_LOG = "train_log.jsonl"


class TrainLogger:
    """Rank-0 sink for step and eval metrics.

    `train_log.jsonl` holds one line per step; on resume, lines past the resumed
    step (written after the last checkpoint) are dropped so the log matches the run.
    """

    def __init__(self, run_dir, ctx: ParallelContext, cfg: TrainConfig, start_step: int = 0, prefix: str = "train"):
        self.active = ctx.is_main
        self.cfg, self.prefix = cfg, prefix
        if not self.active:
            return
        self.path = Path(run_dir) / TRAIN_LOG
        self._truncate(start_step)
        self.bar = tqdm(total=cfg.steps, initial=start_step, desc=prefix, dynamic_ncols=True,
                        disable=os.environ.get("MINITRON_NO_PROGRESS") == "1")
        self.tb = self._tensorboard(run_dir) if cfg.tensorboard else None
        self.wandb = self._wandb(run_dir) if cfg.wandb else None

    def _truncate(self, start_step: int) -> None:
        if not self.path.is_file():
            return
        kept = [l for l in self.path.read_text().splitlines() if json.loads(l).get("step", 0) <= start_step]
        self.path.write_text("".join(l + "\n" for l in kept))

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

    def _emit(self, step: int, metrics: dict, kind: str) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
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
        self.bar.update(1)
        if step % self.cfg.log_interval == 0:
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")

    def log_eval(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        self._emit(step, metrics, "eval")
        self.bar.write(f"step {step}: val_loss {metrics['val_loss']:.4f} ppl {metrics['ppl']:.2f}")

    def close(self) -> None:
        if not self.active:
            return
        self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
