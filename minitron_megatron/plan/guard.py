"""`distill` refuses, before it loads a teacher, a run whose plan cannot fit on its GPU; `prune`
refuses, before it loads its model, one whose weights cannot (`refuse_prune_if_over`).

Each rank plans its own stage from Megatron's GPTModel built on the meta device in the real
runtime (this rank's exact shapes), with the run's attention implementation and recomputation
(model.transformer_impl, model.recompute_granularity) and optimizer (distill.optim.use_distributed_optimizer,
as resolved for this run). The plan came within 3% below measured CPU peaks
(benchmarks/plan_vs_measured.py), so a plan larger than the whole device will not fit; what it
does not count (CUDA context, NCCL buffers, fragmentation) only makes it worse. Skipped on CPU
(no device limit) and with `distill.memory_check=false`.
"""

from typing import Dict, Optional

import torch
import torch.distributed as dist

from minitron_megatron.errors import ConfigError
from minitron_megatron.plan.estimate import KINDS, PlanInputs, stage_bytes

GIB = 1 << 30


def _local_counts(cfg, ctx, parallel, padded_vocab):
    from minitron_megatron.model.build import build_gpt_model
    from minitron_megatron.plan.layout import count_local

    return count_local(build_gpt_model(cfg, ctx, parallel, padded_vocab, init="meta"))


def distill_plan_inputs(inputs, cfg, ctx, distributed_optimizer: bool = False) -> PlanInputs:
    """The plan of a prepared `distill` run (distill/setup.py DistillInputs) on this runtime,
    with the optimizer it resolved (train/optimizer.py `data_parallel_settings`)."""
    from minitron_megatron.model.build import transformer_impl

    run, teacher = inputs.run, inputs.teacher
    # Megatron's local core attention saves the [b, heads, s, s] probabilities; SDPA and
    # Transformer Engine's fused attention keep O(s) state.
    attention = "local" if transformer_impl(run.model_cfg, ctx.device) == "local" else "sdpa"
    return PlanInputs(
        attention=attention, recompute=run.model_cfg.recompute_granularity or "none",
        teacher=teacher.cfg.resolved(), student=run.model_cfg.resolved(), parallel=cfg.parallel, dp=ctx.dp_size,
        padded_vocab=run.padded_vocab, seq_length=run.seq_length, micro_batch_size=cfg.distill.micro_batch_size,
        global_batch_size=cfg.distill.global_batch_size, teacher_dtype=teacher.cfg.params_dtype,
        teacher_precision=cfg.teacher.precision, student_dtype=run.model_cfg.params_dtype,
        distributed_optimizer=distributed_optimizer, kd_impl=cfg.distill.kd_impl, kd_chunk_tokens=cfg.distill.kd_chunk_tokens)


def refuse_if_over(inputs, cfg, ctx, limit_bytes: Optional[int] = None,
                   distributed_optimizer: bool = False) -> Optional[int]:
    """Raise a ConfigError on every rank when some rank's planned bytes exceed `limit_bytes`
    (default: this CUDA device's total memory; on CPU nothing is checked). Returns the largest
    planned total over the ranks (None when skipped)."""
    if limit_bytes is None:
        if ctx.device.type != "cuda" or not getattr(cfg.distill, "memory_check", True):
            return None
        limit_bytes = torch.cuda.get_device_properties(ctx.device).total_memory
    inp = distill_plan_inputs(inputs, cfg, ctx, distributed_optimizer)
    mine = stage_bytes(inp, ctx.pp_rank, _local_counts(inp.teacher, ctx, inputs.teacher_parallel,
                                                       inputs.teacher.padded_vocab),
                       _local_counts(inp.student, ctx, cfg.parallel, inp.padded_vocab))
    worst = torch.tensor([sum(mine.values())], dtype=torch.int64, device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    worst = int(worst.item())
    if worst > limit_bytes:
        kinds = ", ".join(f"{k} {mine[k] / GIB:.1f}" for k in KINDS)
        raise ConfigError(
            f"this distillation needs about {worst / GIB:.1f} GiB on its largest rank but the device has "
            f"{limit_bytes / GIB:.1f} GiB (this rank, GiB: {kinds}); lower distill.micro_batch_size or "
            "seq_length, raise parallel.tp / parallel.pp, or use teacher.precision=fp8 "
            "(`python -m minitron_megatron.plan` with the same settings shows the plan); "
            "distill.memory_check=false runs it anyway")
    return worst


def prune_bytes(source_cfg, new_cfg, ctx, source_parallel, new_parallel, padded_vocab: int, seq_length: int,
                micro_batch_size: int) -> Dict[str, int]:
    """What `prune` holds on this rank at least, by kind: the source model's weights, the pruned
    model's (trim builds it beside the source; None: stage=importance), and on the last pipeline
    stage one calibration micro batch's float32 logits [b, s, V/tp] and their log-softmax (the
    loss-based depth metrics and the evaluation). Activations of the forward, which run without
    autograd, are a few layers' working sets: not counted, so this is a lower bound."""
    from minitron_megatron.plan.memory import DTYPE_BYTES, FP32

    out = {"source_weights": _local_counts(source_cfg, ctx, source_parallel, padded_vocab)["params"]
           * DTYPE_BYTES[source_cfg.params_dtype]}
    out["pruned_weights"] = 0 if new_cfg is None else (
        _local_counts(new_cfg, ctx, new_parallel, padded_vocab)["params"] * DTYPE_BYTES[new_cfg.params_dtype])
    last_stage = ctx.pp_rank == ctx.pp_size - 1
    out["logits"] = 2 * micro_batch_size * seq_length * (padded_vocab // ctx.tp_size) * FP32 if last_stage else 0
    return out


def refuse_prune_if_over(source_cfg, new_cfg, ctx, source_parallel, new_parallel, padded_vocab: int,
                         seq_length: int, micro_batch_size: int, memory_check: bool = True,
                         limit_bytes: Optional[int] = None) -> Optional[int]:
    """Raise a ConfigError on every rank when some rank's `prune_bytes` exceed `limit_bytes`
    (default: this CUDA device's memory; on CPU, or with prune.memory_check=false, nothing is
    checked). Returns the largest total over the ranks (None when skipped)."""
    if limit_bytes is None:
        if ctx.device.type != "cuda" or not memory_check:
            return None
        limit_bytes = torch.cuda.get_device_properties(ctx.device).total_memory
    mine = prune_bytes(source_cfg, new_cfg, ctx, source_parallel, new_parallel, padded_vocab, seq_length,
                       micro_batch_size)
    worst = torch.tensor([sum(mine.values())], dtype=torch.int64, device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    worst = int(worst.item())
    if worst > limit_bytes:
        kinds = ", ".join(f"{k} {v / GIB:.1f}" for k, v in mine.items())
        raise ConfigError(
            f"this prune needs at least {worst / GIB:.1f} GiB on its largest rank but the device has "
            f"{limit_bytes / GIB:.1f} GiB (this rank, GiB: {kinds}); raise parallel.tp / parallel.pp, lower "
            "prune.importance.micro_batch_size or seq_length; prune.memory_check=false runs it anyway")
    return worst
