"""One reduction of the local accumulators into global score tensors (as at TP=1/PP=1/DP=1).

Order matters because the finish (sqrt, variance) is nonlinear:
  1. DP:  sum the raw float64 batch sums and sample counts (every DP rank saw other samples).
  2. finish locally: per-unit scores of this rank's heads/tp, ffn/tp, its stage's norms.
  3. TP:  all-gather the sharded scores; rank r holds units [r*n/tp, (r+1)*n/tp), so
          concatenating in rank order is the global order. Hidden-channel scores are
          replicated over TP (never summed over it); Block-Importance token sums are
          summed over TP only under sequence parallelism (each rank saw s/tp tokens).
  4. PP:  each stage writes its layers at their global index (from `layer_number`) into
          zero tensors; a sum over the pipeline group fills every layer exactly once.
Each step is one collective on one flat buffer. A MoE model's routed-expert sums take one
sum over the world instead (importance/moe.py: experts live on EP ranks, which are DP ranks
for everything else); its shared expert is split over TP like a dense MLP and follows 1-4.
"""

from typing import Dict, List

import torch
import torch.distributed as dist

from minitron_megatron.importance.aggregation import batch_finish
from minitron_megatron.importance.collector import ImportanceCollector
from minitron_megatron.importance.moe import moe_scores
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.trim.hidden import norm_row, num_norm_rows


def all_reduce_flat(tensors: List[torch.Tensor], group, op=dist.ReduceOp.SUM) -> None:
    """In-place sum of several tensors over `group` with one collective."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op, group=group)
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(chunk.view_as(t))


def _sum_over_dp(col: ImportanceCollector, ctx: ParallelContext) -> None:
    if ctx.dp_size == 1:
        return
    stats = [*col.heads.values(), *col.neurons.values(), *col.shared.values(), *col.channels.values()]
    moments = [*col.moments.values(), *col.moment_tokens.values()]
    all_reduce_flat([s.acc for s in stats] + list(col.block.values()) + moments + [col.samples], ctx.dp_group)


def _stacked(stats: Dict[int, object], layers: List[int]) -> torch.Tensor:
    return torch.stack([stats[i].acc for i in layers], dim=1)  # [2, layers_local, n_local]


def _gather_tp(local: List[torch.Tensor], ctx: ParallelContext) -> List[List[torch.Tensor]]:
    """[rank][i] = rank's local[i], for every TP rank (one all-gather)."""
    if ctx.tp_size == 1:
        return [local]
    flat = torch.cat([t.reshape(-1) for t in local])
    gathered = [torch.empty_like(flat) for _ in range(ctx.tp_size)]
    dist.all_gather(gathered, flat, group=ctx.tp_group)
    sizes = [t.numel() for t in local]
    return [[c.view_as(t) for c, t in zip(g.split(sizes), local)] for g in gathered]


def _mlp_widths(col: ImportanceCollector) -> Dict[str, tuple]:
    """{score name: (this stage's WidthStats by layer, global width)} of the TP-split MLP axes."""
    probes = col.probes
    widths = {"mlp.neuron": (col.neurons, probes.ffn_hidden_size),
              "moe.shared_neuron": (col.shared, probes.moe_shared_expert_intermediate_size)}
    return {name: found for name, found in widths.items() if found[0]}


def reduce_statistics(col: ImportanceCollector, batch_agg: str, ctx: ParallelContext) -> Dict[str, torch.Tensor]:
    """Global float64 scores, the same on every rank of this (TP, PP, EP, DP) layout.

    Returns attn.head [L, heads], mlp.neuron [L, ffn] (dense models), hidden.channel [h] (the
    sum over every norm), hidden.channel_by_norm [2L+1, h], hidden.norm_moments [2L+1, 2, h]
    (rows in trim/hidden.py's order), depth.block_importance [L] (when collected), `samples`,
    and for a MoE model the moe.* scores of importance/moe.py and moe.shared_neuron [L, shared].
    """
    probes = col.probes
    col.end_microbatch()
    _sum_over_dp(col, ctx)
    samples = col.samples.clone()
    layers = [p.layer_index for p in probes.layers]
    heads = batch_finish(_stacked(col.heads, layers), samples, batch_agg)  # [L_local, heads/tp]
    widths = _mlp_widths(col)
    # [L_local, ffn/tp] (dense) or [L_local, shared/tp] (MoE): every layer of a model is one or the other
    neurons = {name: batch_finish(_stacked(stats, layers), samples, batch_agg) for name, (stats, _) in widths.items()}
    L, dev, h = probes.num_layers, ctx.device, probes.hidden_size
    rows = [norm_row(name, L) for name in col.channels]  # this stage's norms, at their global rows
    by_norm = torch.zeros(num_norm_rows(L), h, dtype=torch.float64, device=dev)
    by_norm[rows] = torch.stack([batch_finish(s.acc, samples, batch_agg) for s in col.channels.values()])
    moments = torch.zeros(num_norm_rows(L), 3, h, dtype=torch.float64, device=dev)  # sum z, sum z^2, tokens
    moments[rows, :2] = torch.stack(list(col.moments.values()))
    moments[rows, 2] = torch.stack(list(col.moment_tokens.values())).expand(-1, h)
    if probes.sequence_parallel and ctx.tp_size > 1:
        # Each TP rank normalised its own s/tp tokens of the same samples: their sums add up.
        all_reduce_flat([moments], ctx.tp_group)
    block = torch.stack([col.block[i] for i in layers], dim=1)  # [2, L_local]: cos sum, tokens

    per_rank = _gather_tp([heads, block, *neurons.values()], ctx)
    heads = torch.cat([r[0] for r in per_rank], dim=1)  # [L_local, heads]
    if probes.sequence_parallel and ctx.tp_size > 1:
        block = sum(r[1] for r in per_rank)

    out = {
        "attn.head": torch.zeros(L, probes.num_attention_heads, dtype=torch.float64, device=dev),
        "hidden.channel_by_norm": by_norm,
        "hidden.norm_moments": moments,
        "block_sums": torch.zeros(2, L, dtype=torch.float64, device=dev),
    }
    out["attn.head"][layers] = heads
    out["block_sums"][:, layers] = block
    for k, (name, (_, width)) in enumerate(widths.items()):
        out[name] = torch.zeros(L, width, dtype=torch.float64, device=dev)
        out[name][layers] = torch.cat([r[2 + k] for r in per_rank], dim=1)  # [L_local, width]
    if ctx.pp_size > 1:
        all_reduce_flat(list(out.values()), ctx.pp_group)
    block_sums = out.pop("block_sums")
    moments = out.pop("hidden.norm_moments")
    out["hidden.norm_moments"] = moments[:, :2] / moments[:, 2:].clamp_min(1)  # [2L+1, 2, h]: E[z], E[z^2]
    out["hidden.channel"] = out["hidden.channel_by_norm"].sum(0)
    if col.block_importance:
        out["depth.block_importance"] = 1 - block_sums[0] / block_sums[1].clamp_min(1)
    if col.moe is not None:
        out.update(moe_scores(col.moe, col.seq_agg))
    out["samples"] = samples
    return out


def group_scores(head_scores: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """Query-group score = sum of its heads' scores: [L, heads] -> [L, groups].

    Heads of a group are contiguous (Megatron's QKV layout [q_1..q_n, k, v] per group),
    and removing a group removes all of its heads, so the importance lost is their sum.
    """
    L, heads = head_scores.shape
    return head_scores.view(L, num_query_groups, heads // num_query_groups).sum(-1)


def broadcast_scores(scores: Dict[str, torch.Tensor], ctx: ParallelContext) -> None:
    """Make every rank hold rank 0's bits, in place.

    Replicated values (hidden channels, losses) are computed redundantly on TP ranks and
    collectives need not be bitwise identical everywhere; a trimmer that ranks ties
    differently on two ranks would cut different channels, so we do not rely on it.
    """
    if ctx.world_size == 1 or not dist.is_initialized():
        return
    names = sorted(scores)
    flat = torch.cat([scores[n].reshape(-1).to(torch.float64) for n in names])
    dist.broadcast(flat, src=0)
    for name, chunk in zip(names, flat.split([scores[n].numel() for n in names])):
        scores[name] = chunk.view_as(scores[name]).to(scores[name].dtype)
