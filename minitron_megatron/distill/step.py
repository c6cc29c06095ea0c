"""One KD optimizer step and one KD evaluation pass, through Megatron's pipeline schedules.

Reuses `train.step` (schedule call, optimizer step, reduction of reported losses)
with the distillation forward step and loss, reporting every loss component.
"""

import math
from functools import partial
from typing import Callable, Dict, Iterator

import torch

from minitron_megatron.distill.objective import DistillLoss
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train.step import reported_means, run_schedule, tracked_batches, train_step

METRIC_NAMES = {"loss": "loss", "kd loss": "kd_loss", "lm loss": "lm_loss", "is loss": "is_loss", "alpha": "alpha",
                "router loss": "router_loss"}


def distill_forward_step(device: torch.device, loss: DistillLoss) -> Callable:
    """A `forward_step_func(data_iterator, model)` for a `DistillationModel` (any PP stage)."""

    def forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       loss_mask=batch["loss_mask"])
        return output, partial(loss, batch["loss_mask"])

    return forward_step


def _metric_names(keys) -> dict:
    return {key: METRIC_NAMES[key] for key in keys}


def distill_train_step(model_chunks, optimizer, scheduler, batches, ctx: ParallelContext, num_microbatches: int,
                       micro_batch_size: int, seq_length: int, loss: DistillLoss) -> dict:
    """Forward-backward over one global batch, one optimizer step; every loss component.

    The schedule sizes p2p buffers from get_model_config(model).hidden_size, which the
    DistillationModel sets to the student + teacher width (see distill/model.py).
    """
    return train_step(model_chunks, optimizer, scheduler, batches, ctx, num_microbatches, micro_batch_size,
                      seq_length, forward_step_func=distill_forward_step(ctx.device, loss),
                      metric_names=_metric_names(loss.reported_keys))


@torch.no_grad()
def evaluate_distill(model_chunks, batches, ctx: ParallelContext, num_microbatches: int, micro_batch_size: int,
                     seq_length: int, loss: DistillLoss) -> dict:
    """Student LM loss (`val_loss`, comparable with `evaluate`) and KD loss on validation data."""
    for chunk in model_chunks:
        chunk.eval()
    data, progress = tracked_batches(batches, ctx, "evaluate")
    with progress:
        outputs = run_schedule(distill_forward_step(ctx.device, loss), data, model_chunks,
                               num_microbatches, micro_batch_size, seq_length, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    means = reported_means(outputs, _metric_names(k for k in loss.reported_keys if k != "alpha"), ctx)
    val_loss = means.pop("lm_loss")
    result = {"val_loss": val_loss, "ppl": math.exp(min(val_loss, 50.0)), **means}
    result["val_kd_loss"] = result.pop("kd_loss")
    result["val_total_loss"] = result.pop("loss")
    for name in ("is_loss", "router_loss"):
        if name in result:
            result[f"val_{name}"] = result.pop(name)
    return result
