"""Score dicts for `plan_from_scores`: the estimator's file, random scores, weight magnitudes.

All three return `{name: tensor}` in the contract of config/prune.py (global order, larger =
more important), so the importance, random and magnitude plans share one selection rule
and differ only in what ranks the units.
"""

from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.model import layout as L
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.trim.plan import score_shapes
from minitron_megatron.trim.reshard import to_units

IMPORTANCE_FILE = "importance.safetensors"


def load_scores(path) -> Dict[str, torch.Tensor]:
    """Scores from `importance.safetensors` (a file, or a run dir holding one), as float32 on CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / IMPORTANCE_FILE
    if not path.is_file():
        raise ConfigError(f"prune.scores: {path} not found (run the importance stage first, prune.stage=importance)")
    return {k: v.float() for k, v in load_file(str(path)).items()}


def random_scores(model_cfg: ModelConfig, seed: int, contiguous_k: int = 2) -> Dict[str, torch.Tensor]:
    """Uniform random scores (the random-pruning baseline); the same on every rank for a seed."""
    gen = torch.Generator().manual_seed(seed)
    scores = {k: torch.rand(shape, generator=gen) for k, shape in sorted(score_shapes(model_cfg).items())}
    layers = model_cfg.resolved().num_layers
    scores["depth.contiguous"] = torch.rand(max(layers - contiguous_k + 1, 1), generator=gen)
    return scores


@torch.no_grad()
def magnitude_scores(model, model_cfg: ModelConfig, ctx: ParallelContext,
                     contiguous_k: int = 2) -> Dict[str, torch.Tensor]:
    """L2 norms of the weights each unit owns (the magnitude-pruning baseline).

    head: its Q rows and proj columns; group: its heads plus its K and V rows; neuron: its
    fc1 rows (both GLU halves) and fc2 column; hidden channel: every weight column/row
    indexed by it; layer: all its weights; routed expert: all its weights (moe.expert, and
    moe.expert_frequency, which weights cannot measure, the same). Each rank sums squares of
    its own shard into global-sized buffers, counting each weight once per world (replica 0:
    DP rank 0, for routed experts expert-DP rank 0, as `count_model_parameters`), then one
    all-reduce over the world completes them, so every rank gets the same scores.
    """
    cfg = model_cfg.resolved()
    sq = {k: torch.zeros(shape, dtype=torch.float64, device=ctx.device) for k, shape in score_shapes(cfg).items()}
    for name, param in L.non_layer_parameters(model):
        _add_hidden(sq, param.detach(), L.param_layout(name, param), ctx)
    for layer in L.decoder_layers(model):
        _add_layer(sq, layer, cfg, ctx)
    flat = torch.cat([t.flatten() for t in sq.values()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    out = {k: chunk.view(t.shape).sqrt().float().cpu()
           for (k, t), chunk in zip(sq.items(), flat.split([t.numel() for t in sq.values()]))}
    out["depth.loss_drop"] = out["depth.block_importance"].clone()
    if cfg.is_moe:
        out["moe.expert_frequency"] = out["moe.expert"].clone()
    bi = out["depth.block_importance"]
    k = min(contiguous_k, bi.numel())
    out["depth.contiguous"] = bi.unfold(0, k, 1).sum(-1)
    return out


def _counts_here(layout: L.ParamLayout, ctx: ParallelContext, expert: bool = False) -> bool:
    """Replica 0 counts (DP rank 0; a routed expert's first replica: whole on its EP rank, copies
    on its expert-DP ranks); in it, replicated parameters on TP rank 0, sharded ones on every rank."""
    if expert:
        return ctx.expert_dp_rank == 0
    return ctx.dp_rank == 0 and (layout.tp_dim is not None or ctx.tp_rank == 0)


def _add_hidden(sq, t: torch.Tensor, layout: L.ParamLayout, ctx, expert: bool = False) -> None:
    if layout.hidden_dim is None or not _counts_here(layout, ctx, expert):
        return
    other = [d for d in range(t.dim()) if d != layout.hidden_dim]
    sq["hidden.channel"] += t.double().pow(2).sum(dim=other) if other else t.double().pow(2)


def _add_layer(sq, layer, cfg: ModelConfig, ctx: ParallelContext) -> None:
    i = L.global_layer_index(layer)
    for name, param in layer.named_parameters():
        layout, t = L.param_layout(name, param), param.detach()
        expert = L.expert_of(name)
        _add_hidden(sq, t, layout, ctx, expert is not None)
        if not _counts_here(layout, ctx, expert is not None):
            continue
        sq["depth.block_importance"][i] += t.double().pow(2).sum()
        if expert is not None:
            _add_expert(sq, i, ctx.ep_rank * (cfg.num_moe_experts // ctx.ep_size) + expert[0], t, layout)
        elif layout.unit_axis is not None:
            _add_units(sq, i, t, layout, cfg, ctx)


def _add_expert(sq, i: int, e: int, t: torch.Tensor, layout: L.ParamLayout) -> None:
    """A routed expert's weight (whole on this rank): its total and, along its neuron axis, per neuron."""
    sq["moe.expert"][i, e] += t.double().pow(2).sum()
    if layout.unit_axis is None:
        return
    units = sq["moe.expert_neuron"].shape[-1]
    per_neuron = to_units(t.double(), layout.tp_dim, layout.stride, units).pow(2).flatten(1).sum(1)  # [F]
    sq["moe.expert_neuron"][i, e] += per_neuron
    sq["moe.neuron"][i] += per_neuron


def _add_units(sq, i: int, t: torch.Tensor, layout: L.ParamLayout, cfg: ModelConfig, ctx) -> None:
    """Per-unit sums of squares of this shard, placed at the shard's global unit offsets."""
    axis = layout.unit_axis
    units = L.num_units(axis, cfg) // ctx.tp_size
    u = to_units(t.double(), layout.tp_dim, layout.stride, units).pow(2)  # [units/tp, stride, rows, ..]
    start = ctx.tp_rank * units
    if axis in L.MLP_AXES + L.SHARED_AXES:
        key = "mlp.neuron" if axis in L.MLP_AXES else "moe.shared_neuron"
        sq[key][i, start:start + units] += u.flatten(1).sum(1)
        return
    per_group, d = cfg.num_attention_heads // cfg.num_query_groups, cfg.kv_channels
    rows = u.reshape(*u.shape[:3], -1).sum((1, 3))  # [G/tp, rows]
    slots = rows.view(units, -1, d).sum(-1)  # [G/tp, n+2 (qkv) or n (proj)]
    heads = slots[:, :per_group]
    sq["attn.head"][i, start * per_group:(start + units) * per_group] += heads.flatten()
    sq["attn.group"][i, start:start + units] += slots.sum(1)
