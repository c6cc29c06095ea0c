"""Apply a TrimPlan to a sharded GPTModel: every rank keeps only its own shard, before and after.

Why a fresh model rather than shrinking modules in place: Megatron caches partition sizes
in many places (TransformerConfig, ColumnParallel/RowParallel `*_size_per_partition`,
attention's heads/groups per partition, core attention's `hidden_size_per_partition`,
projection sizes, norm shapes, TE workspaces), and missing one gives a model that runs
forward but is wrong or fails in backward. Building Megatron's own GPTModel from the
pruned config gets every one right by construction; the trimmer only copies tensors in.
The fresh model is built on the meta device (no memory, no initialisation) and each of
its parameters is assigned its trimmed shard as that is computed; with `release_source`
each old layer is freed as soon as it is trimmed, so the peak is about the source shard
plus one layer, never two models.

Per parameter: hidden channels (replicated over TP) are sliced locally; along a TP-sharded
unit axis (query groups, neurons) each rank selects its kept units and the kept rows inside
them (heads within groups), then `reshard.redistribute` moves only the units that change
owner. Depth: kept layers are renumbered by construction (new layer j = old layer
plan.layers[j]) and a layer whose pipeline stage changes is sent stage to stage (same TP
rank), one layer at a time.
"""

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.model import build_gpt_model
from minitron_megatron.model import layout as L
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.trim.plan import TrimPlan
from minitron_megatron.trim.reshard import UnitPlan, from_units, redistribute, redistribute_over, select_units, \
    to_units


@dataclass
class TrimResult:
    model: torch.nn.Module
    """The pruned GPTModel (this rank's shard)."""
    model_cfg: ModelConfig
    """The pruned architecture, resolved."""
    parallel: ParallelConfig
    """The parallel layout the pruned model was built with (pp_layout may differ)."""


def apply_plan(model, plan: TrimPlan, model_cfg: ModelConfig, ctx: ParallelContext, parallel: ParallelConfig,
               padded_vocab: int, pp_layout: Optional[List[int]] = None, release_source: bool = True) -> TrimResult:
    """Trim `model` (this rank's shard of `model_cfg`) to the plan's architecture.

    Collective over every rank of the model-parallel group (and independent per DP replica).
    `pp_layout` places the pruned layers on stages (None: even split). With `release_source`
    the source model's parameters are emptied as they are consumed: do not use it afterwards.
    `model` is one GPTModel chunk (no virtual pipeline stages), not wrapped in DDP.
    """
    new_cfg = plan.target_config(model_cfg)
    for name, param in model.named_parameters():
        L.param_layout(name, param)  # an unknown parameter (e.g. MoE experts) fails before any work
    new_parallel = replace(parallel, pp_layout=list(pp_layout) if pp_layout else None)
    new_model = build_gpt_model(new_cfg, ctx, new_parallel, padded_vocab, init="meta")
    hidden = _hidden_index(plan, ctx.device)
    _copy_outer(model, new_model, hidden, release_source, plan, model_cfg.resolved())
    _copy_layers(model, new_model, plan, model_cfg.resolved(), hidden, ctx, release_source)
    if release_source:
        _release(model)
    left = [name for name, p in new_model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"trimming left parameters unassigned: {left}")
    return TrimResult(new_model, new_cfg, new_parallel)


def _hidden_index(plan: TrimPlan, device) -> Optional[torch.Tensor]:
    if plan.hidden == list(range(plan.source["hidden_size"])):
        return None
    return torch.tensor(plan.hidden, dtype=torch.long, device=device)


def _copy_outer(old_model, new_model, hidden: Optional[torch.Tensor], release: bool, plan: TrimPlan,
                old_cfg: ModelConfig) -> None:
    """Embeddings, final norm, output layer: same stage before and after, hidden sliced locally."""
    old_params = dict(L.non_layer_parameters(old_model))
    names = [name for name, _ in L.non_layer_parameters(new_model)]
    tensors = [_slice_hidden(old_params[n].detach(), L.param_layout(n, old_params[n]), hidden) for n in names]
    tensors = rescale_norms(names, tensors, plan, old_cfg)
    for name, t in zip(names, tensors):
        _assign(new_model, name, t, copy=not release)
        if release:
            old_params[name].data = old_params[name].data.new_empty(0)


def rescale_norms(names: List[str], tensors: List[torch.Tensor], plan: TrimPlan,
                  old_cfg: ModelConfig) -> List[torch.Tensor]:
    """The plan's norm rescale on trimmed norm weights/biases ([h'], replicated over TP).

    names: full model parameter names (original layer numbers). gamma' = gamma * scale and
    beta' = beta + gamma * shift, on the real gamma (stored + 1 with zero-centred gamma).
    Arithmetic in float32, stored back in the parameter's dtype.
    """
    if not plan.norm_scale:
        return tensors
    out, by_row = list(tensors), {}
    for pos, name in enumerate(names):
        found = L.norm_param(name, old_cfg.num_layers)
        if found is not None:
            by_row.setdefault(found[0], {})[found[1]] = pos
    offset = 1.0 if old_cfg.layernorm_zero_centered_gamma else 0.0
    for row, where in by_row.items():
        if "weight" not in where:
            continue
        w = tensors[where["weight"]]
        gamma = w.float() + offset
        scale, shift = plan.norm_scale[row], (plan.norm_shift or [0.0] * len(plan.norm_scale))[row]
        out[where["weight"]] = (gamma * scale - offset).to(w.dtype)
        if "bias" in where and shift:
            b = tensors[where["bias"]]
            out[where["bias"]] = (b.float() + gamma * shift).to(b.dtype)
    return out


def _slice_hidden(t: torch.Tensor, layout: L.ParamLayout, hidden: Optional[torch.Tensor]) -> torch.Tensor:
    if layout.hidden_dim is None or hidden is None:
        return t
    return t.index_select(layout.hidden_dim, hidden)


def _copy_layers(old_model, new_model, plan: TrimPlan, old_cfg: ModelConfig, hidden, ctx, release) -> None:
    """New layer j <- old layer plan.layers[j], trimmed on the old stage, then moved if needed."""
    old_stages, new_stages = _stage_layers(old_model, ctx), _stage_layers(new_model, ctx)
    old_local = {L.global_layer_index(m): m for m in L.decoder_layers(old_model)}
    new_local = {L.global_layer_index(m): m for m in L.decoder_layers(new_model)}
    pp_ranks = dist.get_process_group_ranks(ctx.pp_group) if ctx.pp_size > 1 else [ctx.rank]
    for j, i in enumerate(plan.layers):
        src, dst = _stage_of(i, old_stages), _stage_of(j, new_stages)
        if ctx.pp_rank == src:
            tensors = trim_layer(old_local[i], plan, j, old_cfg, hidden, ctx)
            if dst == src:
                _fill(new_local[j], tensors, copy=not release)
            else:
                _send_layer(tensors, pp_ranks[dst])
            if release:
                _release(old_local[i])
        elif ctx.pp_rank == dst:
            _fill(new_local[j], _recv_layer(new_local[j], pp_ranks[src], ctx.device))


def _stage_layers(model, ctx: ParallelContext) -> List[List[int]]:
    """Global layer indices held by each pipeline stage (asked of the model, not recomputed)."""
    mine = [L.global_layer_index(m) for m in L.decoder_layers(model)]
    if ctx.pp_size == 1:
        return [mine]
    stages: List = [None] * ctx.pp_size
    dist.all_gather_object(stages, mine, group=ctx.pp_group)
    return stages


def _stage_of(layer: int, stages: List[List[int]]) -> int:
    return next(s for s, held in enumerate(stages) if layer in held)


def _fill(layer, tensors: Dict[str, torch.Tensor], copy: bool = False) -> None:
    names = [name for name, _ in layer.named_parameters()]
    if sorted(names) != sorted(tensors):
        raise RuntimeError(f"trimmed layer parameters {sorted(tensors)} do not match the new layer's {sorted(names)}")
    for name in names:
        _assign(layer, name, tensors[name], copy)


def _assign(root: torch.nn.Module, name: str, t: torch.Tensor, copy: bool = False) -> None:
    """Replace the (meta) parameter `name` of `root` by its trimmed shard.

    A new Parameter is registered (a meta tensor's storage cannot be swapped for a real one)
    carrying over the old one's attributes: Megatron's tensor_model_parallel, partition_dim,
    partition_stride, shared_embedding, ... Without `copy` an untrimmed tensor is taken over
    as is (its old owner is being released); with it, the models never share storage.
    """
    prefix, _, leaf = name.rpartition(".")
    module = root.get_submodule(prefix) if prefix else root
    old = module._parameters[leaf]
    if old.shape != t.shape or old.dtype != t.dtype:
        raise RuntimeError(f"trimmed shard {tuple(t.shape)} {t.dtype} does not fit parameter {name} "
                           f"{tuple(old.shape)} {old.dtype}")
    data = t.clone(memory_format=torch.contiguous_format) if copy else t.contiguous()
    new = torch.nn.Parameter(data, requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    module._parameters[leaf] = new


def _dtype_groups(dtypes: List[torch.dtype]) -> Dict[torch.dtype, List[int]]:
    """Parameter positions per dtype, in order of first appearance (the same on both sides:
    old and new layers have the same parameters). A bf16 layer of the local spec keeps its
    torch norms in float32, so one concatenated buffer would promote the layer to float32."""
    groups: Dict[torch.dtype, List[int]] = {}
    for i, dtype in enumerate(dtypes):
        groups.setdefault(dtype, []).append(i)
    return groups


def _send_layer(tensors: Dict[str, torch.Tensor], dst_rank: int) -> None:
    """One packed buffer per dtype (one message for a single-dtype layer), parameters in name
    order: the receiver orders its new layer's parameters the same way."""
    ordered = [tensors[name] for name in sorted(tensors)]
    for positions in _dtype_groups([t.dtype for t in ordered]).values():
        dist.send(torch.cat([ordered[i].reshape(-1) for i in positions]), dst_rank)


def _recv_layer(layer, src_rank: int, device) -> Dict[str, torch.Tensor]:
    """The layer's tensors from `_send_layer`, sized and typed by the receiving layer's parameters."""
    named = sorted(layer.named_parameters())
    out: Dict[str, torch.Tensor] = {}
    for dtype, positions in _dtype_groups([p.dtype for _, p in named]).items():
        sizes = [named[i][1].numel() for i in positions]
        buf = torch.empty(sum(sizes), dtype=dtype, device=device)
        dist.recv(buf, src_rank)
        for i, chunk in zip(positions, buf.split(sizes)):
            out[named[i][0]] = chunk.view(named[i][1].shape)
    return out


def _release(module) -> None:
    for param in module.parameters():
        param.data = param.data.new_empty(0)


def trim_layer(layer, plan: TrimPlan, j: int, old_cfg: ModelConfig, hidden, ctx) -> Dict[str, torch.Tensor]:
    """Trimmed shards of every parameter of `layer` (old layer plan.layers[j]), keyed by their
    names in the new layer (a routed expert's local index is the new one).

    Collective over the TP group (resharding) and, for a MoE layer, the EP group (experts
    moving to their new owners), so every TP and EP rank of the stage calls it.
    """
    units = layer_unit_plans(plan, j, old_cfg)
    folds = plan.head_folds[j] if plan.head_folds else []
    out, names, experts = [], [], {}
    for name, param in layer.named_parameters():
        layout = L.param_layout(name, param)
        t = _slice_hidden(param.detach(), layout, hidden)
        expert = L.expert_of(name)
        if expert is not None:
            experts.setdefault(expert[0], {})[expert[1]] = (t, layout)
            continue
        if layout.expert_dim is not None:  # the router's rows: one per routed expert, replicated
            t = t.index_select(layout.expert_dim, torch.tensor(plan.experts[j], device=t.device))
        elif layout.unit_axis is not None:
            t = _trim_units(t, layout, units[layout.unit_axis], folds if layout.unit_axis == L.AXIS_QKV else [],
                            old_cfg, ctx)
        out.append(t)
        names.append(name)
    out = rescale_norms([f"decoder.layers.{plan.layers[j]}.{name}" for name in names], out, plan, old_cfg)
    trimmed = dict(zip(names, out))
    if experts:
        trimmed.update(_trim_experts(experts, plan, j, old_cfg, ctx))
    return trimmed


def _trim_experts(local: Dict[int, Dict[str, tuple]], plan: TrimPlan, j: int, old_cfg: ModelConfig,
                  ctx: ParallelContext) -> Dict[str, torch.Tensor]:
    """This EP rank's new routed experts of kept layer j, keyed by their new parameter names.

    Experts are units of the EP group as query groups are of TP (trim/reshard.py): EP rank r
    holds global experts [r*E/ep, (r+1)*E/ep) before and kept positions [r*K/ep, (r+1)*K/ep)
    after. Each old owner trims its kept experts (hidden columns, the expert's own kept
    neurons), packs each into one row per dtype, and one all_to_all over the EP group moves
    only the experts that change owner. `local`: old local expert -> suffix -> (tensor with
    hidden already sliced, layout).
    """
    experts = UnitPlan(old_cfg.num_moe_experts, list(plan.experts[j]))
    positions = experts.local_kept(ctx.ep_rank, ctx.ep_size)  # kept positions this rank owns now
    first = experts.local_range(ctx.ep_rank, ctx.ep_size).start
    suffixes = sorted(next(iter(local.values())))
    rows = []  # per kept expert here: its trimmed tensors in suffix order
    for pos in positions:
        neurons = plan.expert_ffn[j][pos]
        keep = torch.tensor(neurons, dtype=torch.long, device=ctx.device)
        tensors = []
        for suffix in suffixes:
            t, layout = local[plan.experts[j][pos] - first][suffix]
            if layout.unit_axis is not None and len(neurons) < old_cfg.moe_ffn_hidden_size:
                u = to_units(t, layout.tp_dim, layout.stride, old_cfg.moe_ffn_hidden_size)  # [F, stride, 1, ..]
                t = from_units(u.index_select(0, keep), layout.tp_dim)
            tensors.append(t)
        rows.append(tensors)
    shapes = _expert_shapes(local, suffixes, plan, j, old_cfg)
    per_rank = len(plan.experts[j]) // ctx.ep_size
    received = [dict() for _ in range(per_rank)]
    for dtype, idx in _dtype_groups([dtype for _, dtype in shapes]).items():
        sizes = [math.prod(shapes[i][0]) for i in idx]
        packed = torch.stack([torch.cat([r[i].reshape(-1) for i in idx]) for r in rows]) if rows else \
            torch.empty((0, sum(sizes)), dtype=dtype, device=ctx.device)  # [k_r, numel of one expert]
        moved = redistribute_over(packed, experts, ctx.ep_rank, ctx.ep_size, ctx.ep_group)  # [K/ep, numel]
        for q in range(per_rank):
            for i, chunk in zip(idx, moved[q].split(sizes)):
                received[q][suffixes[i]] = chunk.view(shapes[i][0])
    return {L.expert_param_name(q, suffix): t for q, by_suffix in enumerate(received) for suffix, t in by_suffix.items()}


def _expert_shapes(local, suffixes: List[str], plan: TrimPlan, j: int, old_cfg: ModelConfig):
    """(shape, dtype) of each trimmed expert parameter, known on every rank (one whose experts
    are all dropped still receives)."""
    width = len(plan.expert_ffn[j][0])
    out = []
    for suffix in suffixes:
        t, layout = next(iter(local.values()))[suffix]
        shape = list(t.shape)
        if layout.unit_axis is not None:
            shape[layout.tp_dim] = shape[layout.tp_dim] // old_cfg.moe_ffn_hidden_size * width
        out.append((tuple(shape), t.dtype))
    return out


def _trim_units(t, layout: L.ParamLayout, up: UnitPlan, folds, old_cfg: ModelConfig, ctx) -> torch.Tensor:
    if up.is_identity() and not folds:
        return t
    u = to_units(t, layout.tp_dim, layout.stride, up.units // ctx.tp_size)  # [G/tp or F/tp, stride, rows, ..]
    if folds:
        u = fold_query_heads(u.clone(), folds, up.local_range(ctx.tp_rank, ctx.tp_size).start, old_cfg)
    u = select_units(u, up, ctx)  # [kept here, stride, rows', ..]
    u = redistribute(u, up, ctx)  # [K/tp, stride, rows', ..]
    return from_units(u, layout.tp_dim)


def layer_unit_plans(plan: TrimPlan, j: int, old_cfg: ModelConfig) -> Dict[str, UnitPlan]:
    """The four unit axes of kept layer j: groups (rows = kept heads' Q, K, V) and neurons."""
    per_group, head_dim = old_cfg.num_attention_heads // old_cfg.num_query_groups, old_cfg.kv_channels
    groups, heads = plan.groups[j], plan.heads[j]
    slots = {g: sorted(h - g * per_group for h in heads if h // per_group == g) for g in groups}
    all_heads = len(heads) == len(groups) * per_group
    qkv = None if all_heads else [L.qkv_rows_in_group(slots[g], per_group, head_dim) for g in groups]
    proj = None if all_heads else [L.proj_cols_in_group(slots[g], head_dim) for g in groups]
    neurons = UnitPlan(old_cfg.ffn_hidden_size, list(plan.ffn[j]))
    out = {L.AXIS_QKV: UnitPlan(old_cfg.num_query_groups, list(groups), qkv),
           L.AXIS_PROJ: UnitPlan(old_cfg.num_query_groups, list(groups), proj),
           L.AXIS_FC1: neurons, L.AXIS_FC2: neurons}
    if plan.shared_ffn is not None:
        shared = UnitPlan(old_cfg.moe_shared_expert_intermediate_size, list(plan.shared_ffn[j]))
        out.update({L.AXIS_SHARED_FC1: shared, L.AXIS_SHARED_FC2: shared})
    return out


def fold_query_heads(u: torch.Tensor, folds, first_group: int, old_cfg: ModelConfig) -> torch.Tensor:
    """Residual rule on query weights: q_kept <- q_kept + (q_kept - q_pruned), for pairs of
    heads in this rank's groups. u: QKV units [G/tp, 1, (n+2)*d, ..]; pairs share a group."""
    per_group, head_dim = old_cfg.num_attention_heads // old_cfg.num_query_groups, old_cfg.kv_channels
    for kept, pruned in folds:
        group = kept // per_group - first_group
        if not 0 <= group < u.shape[0]:
            continue  # another TP rank holds this group
        rows_k = L.query_rows(kept % per_group, head_dim)
        rows_p = L.query_rows(pruned % per_group, head_dim)
        u[group, :, rows_k] = 2 * u[group, :, rows_k] - u[group, :, rows_p]
    return u
