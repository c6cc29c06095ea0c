"""Megatron DDP, optimizer and LR schedule around a model, wired as Megatron-LM wires them."""

from typing import List, Tuple

from minitron_megatron.config.train import OptimConfig


def wrap_float16(model):
    """A bf16/fp16 GPTModel inside Megatron's Float16Module, as Megatron-LM's `get_model` wraps it
    (float32 models unchanged): its forward hands the last stage's output up in float32."""
    if not (model.config.bf16 or model.config.fp16):
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(config=model.config, module=model)


def wrap_ddp(model, tconfig) -> "DistributedDataParallel":  # noqa: F821
    """Megatron's DDP: contiguous fp32 grad buffers, all-reduced over DP after the last microbatch.

    Mixed precision as in Megatron-LM: bf16/fp16 parameters accumulate their gradients into
    float32 `main_grad` buffers (`grad_reduce_in_fp32`), and `build_optimizer` gives them
    float32 main parameters and Adam state (Float16OptimizerWithFloat16Params)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    return DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks: List, optim: OptimConfig, tconfig, total_steps: int, *,
                    global_batch_size: int) -> Tuple:
    """(MegatronOptimizer, OptimizerParamScheduler) with warm-up then cosine decay.

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
        use_distributed_optimizer=False,
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
