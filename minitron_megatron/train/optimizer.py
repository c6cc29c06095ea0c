"""Megatron DDP, optimizer and LR schedule around a model, wired as Megatron-LM wires them.

Data parallelism is Megatron's own: `DistributedDataParallel` with, when DP > 1 (or as the run
asks, `<stage>.optim.use_distributed_optimizer`), its distributed optimizer (ZeRO-1: each DP rank
owns 1/DP of the float32 main weights and Adam state, gradients are reduce-scattered and the
updated weights all-gathered), and optionally Megatron's overlap of both with compute.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.train import OptimConfig
from minitron_megatron.errors import ConfigError

DISTRIBUTED_OPTIMIZER_CHOICES = ("auto", "true", "false")


@dataclass(frozen=True)
class DataParallelSettings:
    """The resolved data-parallel settings of one run: Megatron's DistributedDataParallelConfig
    fields of the same names (the optimizer reads the choice back from the DDP wrapper)."""

    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


def optimizer_problems(optim: OptimConfig, setting: str, dp_size: int, save: Optional[str]) -> List[str]:
    """Every problem of the data-parallel optimizer settings (before anything is built)."""
    choice = str(optim.use_distributed_optimizer).lower()
    if choice not in DISTRIBUTED_OPTIMIZER_CHOICES:
        return [f"{setting}.optim.use_distributed_optimizer={optim.use_distributed_optimizer} must be one of "
                f"{', '.join(DISTRIBUTED_OPTIMIZER_CHOICES)}"]
    saved = _saved_with_distributed_optimizer(save)
    if saved is not None and choice != "auto" and (choice == "true") != saved:
        written = "the distributed optimizer" if saved else "the plain (non-distributed) optimizer"
        return [f"{setting}.optim.use_distributed_optimizer={choice}: save={save} holds an unfinished run whose "
                f"optimizer state was written by {written}, which the other optimizer cannot read; resume it "
                f"with {setting}.optim.use_distributed_optimizer=auto (or {str(saved).lower()})"]
    if optim.overlap_param_gather and not resolve_distributed_optimizer(choice, dp_size, saved):
        return [f"{setting}.optim.overlap_param_gather=true needs the distributed optimizer (it overlaps the "
                f"all-gather of its updated weights): set {setting}.optim.use_distributed_optimizer=true"]
    return []


def data_parallel_settings(optim: OptimConfig, setting: str, dp_size: int,
                           save: Optional[str]) -> DataParallelSettings:
    """The settings `wrap_ddp` takes: `use_distributed_optimizer=auto` resolved (a resume
    follows its checkpoint, so a run saved at DP=2 resumes at DP=1 and the other way round)."""
    problems = optimizer_problems(optim, setting, dp_size, save)
    if problems:
        raise ConfigError(problems)
    return DataParallelSettings(
        use_distributed_optimizer=resolve_distributed_optimizer(optim.use_distributed_optimizer, dp_size,
                                                                _saved_with_distributed_optimizer(save)),
        overlap_grad_reduce=optim.overlap_grad_reduce, overlap_param_gather=optim.overlap_param_gather)


def resolve_distributed_optimizer(choice, dp_size: int, saved: Optional[bool] = None) -> bool:
    """`use_distributed_optimizer` (a valid choice) at this DP size; `saved`: what the checkpoint
    being resumed holds (None: nothing to resume)."""
    choice = str(choice).lower()
    if choice != "auto":
        return choice == "true"
    return saved if saved is not None else dp_size > 1


def _saved_with_distributed_optimizer(save: Optional[str]) -> Optional[bool]:
    """Whether `save`'s committed checkpoint holds distributed-optimizer state (None: no
    checkpoint to resume, or one without optimizer state)."""
    if not save:
        return None
    root = rd.checkpoint_root(save)
    if ckpt.latest_iteration(root) is None:
        return None
    return ckpt.optimizer_format(root)


def wrap_float16(model):
    """A bf16/fp16 GPTModel inside Megatron's Float16Module, as Megatron-LM's `get_model` wraps it
    (float32 models unchanged): its forward hands the last stage's output up in float32."""
    if not (model.config.bf16 or model.config.fp16):
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(config=model.config, module=model)


def wrap_ddp(model, tconfig, settings: DataParallelSettings = DataParallelSettings()
             ) -> "DistributedDataParallel":  # noqa: F821
    """Megatron's DDP: contiguous fp32 grad buffers, reduced over DP after the last microbatch
    (all-reduced; reduce-scattered for the distributed optimizer; with overlap_grad_reduce,
    bucket by bucket during the backward pass).

    Mixed precision as in Megatron-LM: bf16/fp16 parameters accumulate their gradients into
    float32 `main_grad` buffers (`grad_reduce_in_fp32`), and `build_optimizer` gives them
    float32 main parameters and Adam state (Float16OptimizerWithFloat16Params, or their 1/DP
    shard in the DistributedOptimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=settings.overlap_grad_reduce,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        overlap_param_gather=settings.overlap_param_gather,
    )
    return DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)


@contextmanager
def params_in_sync(model_chunks: Sequence):
    """Within: every DDP chunk's parameters hold the last optimizer step's values.

    Why: with overlap_param_gather, the distributed optimizer's step leaves each rank's
    parameters outside its own shard stale; the forward pre-hooks all-gather a bucket only when
    the next training forward reaches it. An evaluation or a checkpoint save in between would
    see the previous step's weights, so Megatron-LM turns the hooks off around both (one
    synchronous all-gather), as here. A no-op for every other configuration."""
    hooked = [chunk for chunk in model_chunks if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def build_optimizer(model_chunks: List, optim: OptimConfig, tconfig, total_steps: int, *,
                    global_batch_size: int) -> Tuple:
    """(MegatronOptimizer, OptimizerParamScheduler) with warm-up then cosine decay.

    The distributed optimizer when the chunks' DDP was built for it (`wrap_ddp`'s settings).
    With `tconfig.bf16` / `fp16`, Megatron's OptimizerConfig(bf16/fp16=True) selects
    Float16OptimizerWithFloat16Params: float32 main copies of the model's parameters that
    Adam updates (and that the checkpoint saves, so a resume is exact), then copied back
    into the bf16 parameters. Loss scaling only for fp16 (Megatron's DynamicGradScaler);
    bf16 has float32's exponent range and runs unscaled.

    The scheduler counts SAMPLES, as Megatron-LM's training loop does (it calls
    `step(increment=global_batch_size)`), so a Megatron-LM resume of our checkpoint runs
    the schedule at the right speed; `train_step` advances it by one global batch.
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        clip_grad=optim.clip_grad,
        bf16=tconfig.bf16,
        fp16=tconfig.fp16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=model_chunks[0].ddp_config.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config=config, model_chunks=model_chunks)
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    samples = max(total_steps, 1) * global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer=optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup * global_batch_size,
        lr_decay_steps=samples,
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=samples,
        wd_incr_style="constant",
    )
    # What Megatron-LM's training loop sets: DP grad all-reduce (and tied-embedding
    # grad sync across pipeline stages) after the last microbatch; loss scaling.
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.no_sync_func = model_chunks[0].no_sync if len(model_chunks) == 1 else None
    return optimizer, scheduler
