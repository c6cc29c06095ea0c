"""Training-loop settings (pretraining here; distillation reuses the same loop pieces)."""

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    """Linear warm-up, then cosine decay to min_lr at the last step."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    use_distributed_optimizer: str = "auto"
    """Megatron's DistributedOptimizer (ZeRO-1): each data-parallel rank keeps and updates 1/DP
    of the float32 main weights and Adam state; gradients are reduce-scattered, the updated
    weights all-gathered. true, false or auto (on when the data-parallel size is above 1; on a
    resume, whichever the run's checkpoint was written with, so a run resumes at any DP size).
    A run setting: the model and its checkpoint keys are the same either way."""
    overlap_grad_reduce: bool = False
    """Megatron DDP's overlap of the data-parallel gradient reduction with the backward pass
    (one bucket reduced as soon as its last gradient is ready). Every trainable parameter must
    receive a gradient in every step (Megatron asserts it)."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: all-gather each bucket's updated weights during the next
    forward pass instead of right after the optimizer step."""


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 4
    global_batch_size: int = 8
    """Samples per optimizer step; a multiple of micro_batch_size * data-parallel size."""
    eval_interval: int = 50
    eval_samples: int = 64
    """Validation samples per evaluation (all ranks together)."""
    save_interval: int = 100
    keep_last: int = 2
    """Committed step checkpoints kept in the run dir (the newest included); an older one is
    deleted only after a newer one is committed. 2, not 1: the previous one survives a new one
    that turns out unreadable (a disk or filesystem fault after the commit)."""
    fully_parallel_save: Optional[bool] = None
    """Split each checkpoint's writes over the data-parallel ranks (Megatron-LM's
    --ckpt-fully-parallel-save) instead of DP rank 0 writing its TP/PP slice alone. None: on when
    DP > 1; no effect at DP=1. The files are the same format either way."""
    fully_parallel_load: Optional[bool] = None
    """Resume by reading 1/DP of the checkpoint per DP rank and exchanging the rest over the DP
    group (Megatron-LM's --ckpt-fully-parallel-load). None: on when DP > 1."""
    async_save: bool = False
    """Write periodic checkpoints in a background process while training goes on (Megatron-LM's
    --async-save); each is committed (tracker, pruning) only once every rank's write finished.
    The last, exit_after_steps and preemption saves are written before the run exits."""
    log_interval: int = 10
    exit_after_steps: Optional[int] = None
    """Save and stop after this many steps (like Megatron-LM's --exit-interval); rerun to resume."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    tensorboard: bool = True
    wandb: bool = False
    """Log to wandb in offline mode (WANDB_MODE=offline unless set)."""
