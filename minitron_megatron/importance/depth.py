"""Loss-based depth importance: validation LM loss with layers skipped.

A skipped layer is an identity (its input passes through), applied on the stage
that holds it, so the same pipeline schedule runs at any PP size. One validation
pass per layer (`depth.loss_drop`) and one per run of k consecutive layers
(`depth.contiguous`); the score is the loss increase over the unpruned model, so
larger = more important, like every other score.
"""

import math
from typing import Dict, Iterable, List, Optional

import torch

from minitron_megatron.model.probes import ModelProbes, skipped_layers
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.progress import Progress
from minitron_megatron.train.step import evaluate_loss


def _val_loss(model_chunks, batches: List[dict], ctx: ParallelContext, mbs: int, seq_length: int,
              progress: Optional[Progress] = None) -> float:
    loss = evaluate_loss(model_chunks, batches, ctx, len(batches), mbs, seq_length,
                         desc=None if progress else "evaluate")["val_loss"]
    if progress:
        progress.update()
    return loss


def loss_with_skipped(model_chunks, probes: ModelProbes, layers: Iterable[int], batches: List[dict],
                      ctx: ParallelContext, mbs: int, seq_length: int, progress: Optional[Progress] = None) -> float:
    """Token-weighted validation loss (all DP ranks, the same on every rank) with `layers` skipped."""
    with skipped_layers(probes, layers):
        return _val_loss(model_chunks, batches, ctx, mbs, seq_length, progress)


def _passes(metrics: set, num_layers: int, k: int) -> int:
    """Validation passes `loss_depth_scores` makes: the baseline, one per layer, one per block."""
    per_layer = "loss_drop" in metrics or ("contiguous" in metrics and k == 1)
    blocks = "contiguous" in metrics and k != 1
    return 1 + (num_layers if per_layer else 0) + (num_layers - k + 1 if blocks else 0)


def loss_depth_scores(model_chunks, probes: ModelProbes, batches: List[dict], ctx: ParallelContext, mbs: int,
                      seq_length: int, metrics: Iterable[str], k: int) -> Dict[str, object]:
    """{"baseline": loss, "depth.loss_drop": [L] tensor, "depth.contiguous": [L-k+1], "layer_loss": [...]}.

    Only the metrics asked for are computed; contiguous with k=1 reuses the per-layer losses.
    """
    metrics = set(metrics)
    L = probes.num_layers
    with Progress("importance depth", _passes(metrics, L, k), unit="pass", enabled=ctx.is_main) as progress:
        return _depth_scores(model_chunks, probes, batches, ctx, mbs, seq_length, metrics, k, progress)


def _depth_scores(model_chunks, probes: ModelProbes, batches: List[dict], ctx: ParallelContext, mbs: int,
                  seq_length: int, metrics: set, k: int, progress: Progress) -> Dict[str, object]:
    modes = [chunk.training for chunk in model_chunks]
    L = probes.num_layers
    baseline = _val_loss(model_chunks, batches, ctx, mbs, seq_length, progress)
    out: Dict[str, object] = {"baseline": baseline}
    per_layer = None
    if "loss_drop" in metrics or ("contiguous" in metrics and k == 1):
        per_layer = [loss_with_skipped(model_chunks, probes, [i], batches, ctx, mbs, seq_length, progress)
                     for i in range(L)]
        out["depth.loss_drop"] = torch.tensor(per_layer, dtype=torch.float64) - baseline
        out["layer_loss"] = per_layer
    if "contiguous" in metrics:
        runs = per_layer if k == 1 else [
            loss_with_skipped(model_chunks, probes, range(i, i + k), batches, ctx, mbs, seq_length, progress)
            for i in range(L - k + 1)
        ]
        out["depth.contiguous"] = torch.tensor(runs, dtype=torch.float64) - baseline
        out["block_loss"] = runs
    if "loss_drop" not in metrics:
        out.pop("depth.loss_drop", None)
        out.pop("layer_loss", None)
    for chunk, mode in zip(model_chunks, modes):  # evaluate_loss leaves chunks in train mode
        chunk.train(mode)
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))
