"""One optimizer step and one evaluation pass, through Megatron's pipeline schedules.

The forward step and loss follow Megatron-LM's `pretrain_gpt.py` contract, so
`get_forward_backward_func()` runs them unchanged at any PP size.
"""

from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.progress import Progress, track


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Masked LM loss in Megatron-LM's 3-tuple form: (sum, tokens, {name: [sum, tokens]}).

    The schedule divides the sum by the tokens and the microbatch count for the
    gradient; the reported pair lets evaluation weight every token equally.
    """
    losses = output_tensor.float().view(-1)  # [b*s] per-token CE, already reduced over TP
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}


def lm_forward_step(device: torch.device) -> Callable:
    """A `forward_step_func(data_iterator, model)` for GPT language modelling."""

    def forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
        batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s]
        return output, partial(lm_loss_func, batch["loss_mask"])

    return forward_step


def reduce_reported(outputs: List[dict], key: str, ctx: ParallelContext) -> torch.Tensor:
    """[loss_sum, tokens] summed over microbatches and DP, visible on every rank.

    Only the last pipeline stage computes losses; a sum over the pipeline group
    (zeros elsewhere) hands the result to every stage, rank 0 included.
    """
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    if ctx.is_last_stage:
        for out in outputs:
            total += out[key].to(torch.float64)
        if ctx.dp_size > 1:
            dist.all_reduce(total, group=ctx.dp_group)
    if ctx.pp_size > 1:
        dist.all_reduce(total, group=ctx.pp_group)
    return total


def run_schedule(forward_step_func: Callable, data_iterator, model_chunks, num_microbatches: int,
                 micro_batch_size: int, seq_length: int, forward_only: bool) -> List[dict]:
    """Megatron's schedule for this rank's pipeline stage (1F1B at PP>1): the loss reports
    of the last stage's microbatches (empty on other stages)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )


def reported_means(outputs: List[dict], names: Dict[str, str], ctx: ParallelContext) -> dict:
    """{name: sum / count} of each reported key, over microbatches and DP, on every rank."""
    means = {}
    for key, name in names.items():
        total, count = reduce_reported(outputs, key, ctx).tolist()
        means[name] = total / max(count, 1)
    return means


def train_step(model_chunks, optimizer, scheduler, data_iterator, ctx: ParallelContext,
               num_microbatches: int, micro_batch_size: int, seq_length: int,
               forward_step_func: Callable = None, metric_names: Dict[str, str] = None) -> dict:
    """Forward-backward over the microbatches of one global batch, then one optimizer step.

    `metric_names` maps the loss function's reported keys to metric names
    (default: Megatron-LM's "lm loss" as "loss").
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    outputs = run_schedule(forward_step_func or lm_forward_step(ctx.device), data_iterator, model_chunks,
                           num_microbatches, micro_batch_size, seq_length, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    scheduler.step(increment=num_microbatches * micro_batch_size * ctx.dp_size)  # samples, as Megatron-LM
    return {
        **reported_means(outputs, metric_names or {"lm loss": "loss"}, ctx),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,  # None: clipping off
        "lr": optimizer.param_groups[0]["lr"],
        "skipped": not ok,
    }


def tracked_batches(batches, ctx: ParallelContext, desc: Optional[str]):
    """(iterator over `batches`, its Progress): rank 0 shows the microbatches as the schedule
    takes them; `desc=None` shows nothing (a pass inside a stage with its own progress)."""
    progress = Progress(desc or "", len(batches), unit="microbatch", enabled=ctx.is_main and desc is not None,
                        leave=False)
    return track(batches, progress), progress


@torch.no_grad()
def evaluate_loss(model_chunks, batches, ctx: ParallelContext, num_microbatches: int,
                  micro_batch_size: int, seq_length: int, desc: Optional[str] = "evaluate") -> dict:
    """Token-weighted mean LM loss over `num_microbatches` microbatches of every DP rank;
    `desc` names its progress (None: none)."""
    import math

    for chunk in model_chunks:
        chunk.eval()
    data, progress = tracked_batches(batches, ctx, desc)
    with progress:
        outputs = run_schedule(lm_forward_step(ctx.device), data, model_chunks,
                               num_microbatches, micro_batch_size, seq_length, forward_only=True)
    for chunk in model_chunks:
        chunk.train()
    loss_sum, tokens = reduce_reported(outputs, "lm loss", ctx).tolist()
    loss = loss_sum / max(tokens, 1)
    return {"val_loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens)}
