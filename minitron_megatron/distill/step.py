"""One KD optimizer step and one KD evaluation pass, through Megatron's pipeline schedules.

Mirrors `train.step` (same schedule call, same reduction of reported losses)
with the distillation forward step and loss, reporting every loss component.
"""

import math
from functools import partial
from typing import Callable, Dict, Iterator

import torch

from minitron_megatron.distill.objective import DistillLoss
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train.step import reduce_reported

METRIC_NAMES = {"loss": "loss", "kd loss": "kd_loss", "lm loss": "lm_loss", "is loss": "is_loss", "alpha": "alpha"}


def distill_forward_step(device: torch.device, loss: DistillLoss) -> Callable:
    """A `forward_step_func(data_iterator, model)` for a `DistillationModel` (any PP stage)."""

    def forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss, batch["loss_mask"])

    return forward_step


def _means(outputs, keys, ctx: ParallelContext) -> dict:
    """{metric name: sum / count} over microbatches and DP, the same on every rank."""
    means = {}
    for key in keys:
        total, count = reduce_reported(outputs, key, ctx).tolist()
        means[METRIC_NAMES[key]] = total / max(count, 1)
    return means


def _run_schedule(model_chunks, batches, ctx, num_microbatches, micro_batch_size, seq_length, loss, forward_only):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # The schedule sizes p2p buffers from get_model_config(model).hidden_size, which the
    # DistillationModel sets to the student + teacher width (see distill/model.py).
    return get_forward_backward_func()(
        forward_step_func=distill_forward_step(ctx.device, loss),
        data_iterator=batches,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


def distill_train_step(model_chunks, optimizer, scheduler, batches, ctx: ParallelContext, num_microbatches: int,
                       micro_batch_size: int, seq_length: int, loss: DistillLoss) -> dict:
    """Forward-backward over one global batch, one optimizer step; every loss component."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = _run_schedule(model_chunks, batches, ctx, num_microbatches, micro_batch_size, seq_length,
                            loss, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return {
        **_means(outputs, loss.reported_keys, ctx),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": optimizer.param_groups[0]["lr"],
        "skipped": not ok,
    }


@torch.no_grad()
def evaluate_distill(model_chunks, batches, ctx: ParallelContext, num_microbatches: int, micro_batch_size: int,
                     seq_length: int, loss: DistillLoss) -> dict:
    """Student LM loss (`val_loss`, comparable with `evaluate`) and KD loss on validation data."""
    for chunk in model_chunks:
        chunk.eval()
    outputs = _run_schedule(model_chunks, iter(batches), ctx, num_microbatches, micro_batch_size, seq_length,
                            loss, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    means = _means(outputs, [k for k in loss.reported_keys if k != "alpha"], ctx)
    val_loss = means.pop("lm_loss")
    result = {"val_loss": val_loss, "ppl": math.exp(min(val_loss, 50.0)), **means}
    result["val_kd_loss"] = result.pop("kd_loss")
    result["val_total_loss"] = result.pop("loss")
    if "is_loss" in result:
        result["val_is_loss"] = result.pop("is_loss")
    return result
