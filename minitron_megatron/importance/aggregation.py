"""Aggregating per-token activations into per-unit scores: over the sequence, then the batch.

A statistic starts as per-token values a[s, b, n] (a head's output norm, a neuron's
activation, a norm's output channel). Each sample is reduced over its sequence
(`seq_agg`), then the per-sample values v[b, n] over all samples (`batch_agg`):

  mean: mean of |x|        l2: sqrt(sum of x^2)        var: population variance of x

To be exact whatever the split of samples over microbatches and DP ranks, and of
tokens over sequence-parallel ranks, both stages keep additive float64 moments
(sums), and the nonlinear finish (sqrt, variance) runs once on the complete sums:

  sequence:  mean -> sum |a|      l2 -> sum a^2      var -> (sum a, sum a^2)   per sample
  batch:     (sum v, sum v^2) over samples, plus the sample count

Every sequence aggregate is >= 0, so the batch `mean` of |v| is the mean of v.
"""

import torch

AGGREGATIONS = ("mean", "l2", "var")


def seq_moments(a: torch.Tensor, seq_agg: str) -> torch.Tensor:
    """Per-sample sums over the (possibly sharded) sequence: [s, b, n] -> [k, b, n] float64.

    k = 1 for mean (sum |a|) and l2 (sum a^2), 2 for var (sum a, sum a^2). The sums of
    two sequence shards are the sums of the whole sequence.
    """
    if seq_agg == "mean":
        return a.abs().sum(0, dtype=torch.float64).unsqueeze(0)
    if seq_agg == "l2":
        return a.square().sum(0, dtype=torch.float64).unsqueeze(0)
    a64 = a.to(torch.float64)
    return torch.stack([a64.sum(0), a64.square().sum(0)])


def seq_finish(moments: torch.Tensor, tokens: int, seq_agg: str) -> torch.Tensor:
    """Sequence aggregate per sample from complete sums: [k, b, n] -> [b, n] float64 (>= 0)."""
    if seq_agg == "mean":
        return moments[0] / tokens
    if seq_agg == "l2":
        return moments[0].sqrt()
    mean = moments[0] / tokens
    return (moments[1] / tokens - mean.square()).clamp_min(0)


def batch_moments(v: torch.Tensor) -> torch.Tensor:
    """Additive batch sums of sequence aggregates: [b, n] -> [2, n] (sum v, sum v^2)."""
    return torch.stack([v.sum(0), v.square().sum(0)])


def batch_finish(acc: torch.Tensor, samples, batch_agg: str) -> torch.Tensor:
    """Score per unit from batch sums over every sample: [2, ..., n] -> [..., n] float64."""
    if batch_agg == "mean":
        return acc[0] / samples
    if batch_agg == "l2":
        return acc[1].sqrt()
    mean = acc[0] / samples
    return (acc[1] / samples - mean.square()).clamp_min(0)


def head_token_norms(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head L2 norm of each token's attention output: [s, b, heads * d] -> [s, b, heads] float32."""
    s, b, _ = x.shape
    return torch.linalg.vector_norm(x.view(s, b, heads, -1), dim=-1, dtype=torch.float32)


class WidthStat:
    """Batch sums for one [n]-sized statistic (a layer's heads, neurons, or a norm's channels)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.acc = torch.zeros(2, size, dtype=torch.float64, device=device)  # [2, n]: sum v, sum v^2
        self.calls = 0

    def add(self, per_sample: torch.Tensor) -> None:
        """Add the sequence aggregates of one microbatch: [b, n]."""
        self.acc += batch_moments(per_sample)
        self.calls += 1
