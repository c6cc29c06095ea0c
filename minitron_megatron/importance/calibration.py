"""The calibration pass: forward-only over this rank's calibration microbatches.

Runs through Megatron's `get_forward_backward_func(forward_only=True)`, so pipeline
stages exchange activations exactly as in training and evaluation; the loss
function is a no-op because only the hooks' statistics matter.
"""

from typing import Callable, Dict, Iterator, List, Optional

import torch

from minitron_megatron.runtime.context import ParallelContext


def _no_loss(output_tensor: torch.Tensor):
    """Megatron's 2-tuple loss form (loss, reported): nothing to report."""
    return torch.zeros((), device=output_tensor.device), {}


def calibration_forward_step(device: torch.device, after_microbatch: Optional[Callable[[], None]] = None) -> Callable:
    """A `forward_step_func(data_iterator, model)` that runs the model and reports nothing.

    `after_microbatch` runs right after this stage's forward of each microbatch, on every
    rank of the stage (e.g. the collector's sequence-parallel completion).
    """

    def forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)  # [b, s]
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        output = model(tokens, position_ids, None)  # logits [b, s, vocab/tp] (last stage) or hidden
        if after_microbatch is not None:
            after_microbatch()
        return output, _no_loss

    return forward_step


@torch.no_grad()
def calibration_pass(model_chunks: List[torch.nn.Module], batches: List[dict], ctx: ParallelContext,
                     micro_batch_size: int, seq_length: int,
                     after_microbatch: Optional[Callable[[], None]] = None) -> None:
    """One forward-only pass over `batches` (this DP rank's microbatches) in eval mode."""
    from minitron_megatron.train.step import run_schedule, tracked_batches

    modes = [chunk.training for chunk in model_chunks]
    for chunk in model_chunks:
        chunk.eval()
    data, progress = tracked_batches(batches, ctx, "importance calibration")
    try:
        with progress:
            run_schedule(calibration_forward_step(ctx.device, after_microbatch), data, model_chunks,
                         len(batches), micro_batch_size, seq_length, forward_only=True)
    finally:
        for chunk, mode in zip(model_chunks, modes):
            chunk.train(mode)
