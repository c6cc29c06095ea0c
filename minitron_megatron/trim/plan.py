"""TrimPlan: which GLOBAL indices survive, per axis and layer. Pure data, no tensors, no ranks.

Every rank computes the same plan from the same score tensors (stable sorts, ties to the
lower index), so applying it needs no agreement step. Indices are sorted, so the kept
units keep their original relative order and every TP rank's share of them is a
contiguous run of the kept list.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import DEPTH_METRICS, EXPERT_METRICS
from minitron_megatron.errors import ConfigError

@dataclass
class TrimPlan:
    """Kept global indices of the original model; per-layer lists follow `layers`."""

    source: Dict[str, int]
    """The original sizes (num_layers, hidden_size, ffn_hidden_size, num_attention_heads,
    num_query_groups, kv_channels): the plan is only valid for that architecture."""
    layers: List[int]
    """Kept original layers, ascending; new layer j is original layer layers[j]."""
    hidden: List[int]
    """Kept hidden channels, network-wide."""
    groups: List[List[int]]
    """Per kept layer: kept query groups (with their K/V heads)."""
    heads: List[List[int]]
    """Per kept layer: kept query heads (global head ids, heads_per_group' in each kept group)."""
    ffn: List[List[int]]
    """Per kept layer: kept MLP neurons (both GLU halves of a neuron go together)."""
    head_folds: Optional[List[List[Tuple[int, int]]]] = None
    """Per kept layer: (kept head, pruned head) pairs of the residual rule; None when off."""
    method: str = "importance"
    notes: Dict[str, str] = field(default_factory=dict)
    norm_scale: Optional[List[float]] = None
    """Per original norm (rows of trim/hidden.py): factor on its kept gamma (prune.norm_rescale);
    None: the kept norm weights are copied unchanged."""
    norm_shift: Optional[List[float]] = None
    """Per original norm: beta_kept += gamma_kept * shift (LayerNorm's re-centring); None: none."""
    experts: Optional[List[List[int]]] = None
    """MoE: per kept layer, kept routed experts (global indices, ascending: new expert k is old
    expert experts[j][k], and the router keeps those rows); None for a dense model."""
    expert_ffn: Optional[List[List[List[int]]]] = None
    """MoE: per kept layer, per kept expert (in `experts` order), its kept FFN neurons. Every
    expert keeps the same number but its own most important ones."""
    shared_ffn: Optional[List[List[int]]] = None
    """MoE with a shared expert: per kept layer, its kept neurons."""

    def target_config(self, model_cfg: ModelConfig) -> ModelConfig:
        """The pruned architecture (resolved: kv_channels and groups explicit)."""
        old = model_cfg.resolved()
        self.check_source(old)
        moe = {}
        if self.experts is not None:
            moe = dict(num_moe_experts=len(self.experts[0]), moe_ffn_hidden_size=len(self.expert_ffn[0][0]))
        if self.shared_ffn is not None:
            moe["moe_shared_expert_intermediate_size"] = len(self.shared_ffn[0])
        return replace(old, num_layers=len(self.layers), hidden_size=len(self.hidden),
                       ffn_hidden_size=len(self.ffn[0]), num_attention_heads=len(self.heads[0]),
                       num_query_groups=len(self.groups[0]), **moe)

    def check_source(self, model_cfg: ModelConfig) -> None:
        if source_sizes(model_cfg) != self.source:
            raise ConfigError(f"the trim plan was made for {self.source}, not for {source_sizes(model_cfg)}")

    def is_identity(self) -> bool:
        s = self.source
        return (self.layers == list(range(s["num_layers"])) and self.hidden == list(range(s["hidden_size"]))
                and all(g == list(range(s["num_query_groups"])) for g in self.groups)
                and all(h == list(range(s["num_attention_heads"])) for h in self.heads)
                and all(f == list(range(s["ffn_hidden_size"])) for f in self.ffn) and not self.head_folds
                and not self.norm_scale
                and all(e == list(range(s["num_moe_experts"])) for e in self.experts or [])
                and all(f == list(range(s["moe_ffn_hidden_size"])) for layer in self.expert_ffn or [] for f in layer)
                and all(f == list(range(s["moe_shared_expert_intermediate_size"])) for f in self.shared_ffn or []))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrimPlan":
        body = json.loads(text)
        if body.get("head_folds") is not None:
            body["head_folds"] = [[tuple(p) for p in layer] for layer in body["head_folds"]]
        return cls(**body)


def source_sizes(model_cfg: ModelConfig) -> Dict[str, int]:
    cfg = model_cfg.resolved()
    names = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")
    if cfg.is_moe:  # a dense plan's source keeps the six keys it always had
        names += ("num_moe_experts", "moe_ffn_hidden_size")
        if cfg.moe_shared_expert_intermediate_size is not None:
            names += ("moe_shared_expert_intermediate_size",)
    return {name: int(getattr(cfg, name)) for name in names}


def keep_plan(model_cfg: ModelConfig) -> TrimPlan:
    """The plan that keeps everything (trimming with it is an identity)."""
    s = source_sizes(model_cfg)
    n = s["num_layers"]
    moe = {}
    if "num_moe_experts" in s:
        experts, width = s["num_moe_experts"], s["moe_ffn_hidden_size"]
        moe = dict(experts=[list(range(experts))] * n, expert_ffn=[[list(range(width))] * experts] * n)
    if "moe_shared_expert_intermediate_size" in s:
        moe["shared_ffn"] = [list(range(s["moe_shared_expert_intermediate_size"]))] * n
    return TrimPlan(s, list(range(n)), list(range(s["hidden_size"])), [list(range(s["num_query_groups"]))] * n,
                    [list(range(s["num_attention_heads"]))] * n, [list(range(s["ffn_hidden_size"]))] * n,
                    method="keep", **moe)


def top_k(scores: torch.Tensor, k: int) -> List[int]:
    """Indices of the k largest scores, ascending; ties go to the lower index."""
    order = torch.sort(scores.double().flatten(), descending=True, stable=True).indices
    return sorted(order[:k].tolist())


def _rank(scores: torch.Tensor) -> List[int]:
    """All indices, most important first (stable)."""
    return torch.sort(scores.double().flatten(), descending=True, stable=True).indices.tolist()


def plan_from_scores(model_cfg: ModelConfig, new_cfg: ModelConfig, scores: Dict[str, torch.Tensor], *,
                     drop_layers: Optional[List[int]] = None, depth_metric: str = "block_importance",
                     residual_heads: bool = False, method: str = "importance",
                     expert_metric: str = "contribution") -> TrimPlan:
    """The plan that turns `model_cfg` into `new_cfg` keeping the highest-scoring units.

    `scores` follows the contract of config/prune.py (global order, larger = more important);
    only the keys of the axes that shrink are needed. `new_cfg` comes from `validate_target`.
    """
    old, new = model_cfg.resolved(), new_cfg.resolved()
    check_scores(old, scores, _needed_keys(old, new, scores, drop_layers, depth_metric, expert_metric))
    layers = _kept_layers(old, new, scores, drop_layers, depth_metric)
    hidden = _keep_axis(scores, "hidden.channel", old.hidden_size, new.hidden_size)
    ffn = [_keep_axis(scores, "mlp.neuron", old.ffn_hidden_size, new.ffn_hidden_size, i) for i in layers]
    groups, heads, folds = [], [], []
    for i in layers:
        g, h, f = _attention_layer(old, new, scores, i, residual_heads)
        groups.append(g), heads.append(h), folds.append(f)
    notes = {"depth_metric": depth_metric if drop_layers is None else "explicit"}
    moe = _moe_plan(old, new, scores, layers, expert_metric) if old.is_moe else {}
    if new.is_moe and new.num_moe_experts < old.num_moe_experts:
        notes["expert_metric"] = expert_metric
    return TrimPlan(source_sizes(old), layers, hidden, groups, heads, ffn,
                    head_folds=folds if residual_heads else None, method=method, notes=notes, **moe)


def _moe_plan(old: ModelConfig, new: ModelConfig, scores, layers: List[int], expert_metric: str) -> dict:
    """Kept experts (ranked by `expert_metric`), each kept expert's own top neurons, and the
    shared expert's neurons, per kept layer."""
    experts, expert_ffn = [], []
    for i in layers:
        kept = list(range(old.num_moe_experts))
        if new.num_moe_experts < old.num_moe_experts:
            kept = top_k(expert_ranking(scores, expert_metric)[i], new.num_moe_experts)
        experts.append(kept)
        if new.moe_ffn_hidden_size == old.moe_ffn_hidden_size:
            expert_ffn.append([list(range(old.moe_ffn_hidden_size))] * len(kept))
        else:
            expert_ffn.append([top_k(scores["moe.expert_neuron"][i][e], new.moe_ffn_hidden_size) for e in kept])
    out = dict(experts=experts, expert_ffn=expert_ffn)
    if old.moe_shared_expert_intermediate_size is not None:
        out["shared_ffn"] = [_keep_axis(scores, "moe.shared_neuron", old.moe_shared_expert_intermediate_size,
                                        new.moe_shared_expert_intermediate_size, i) for i in layers]
    return out


def _keep_axis(scores, key: str, size: int, keep: int, layer: Optional[int] = None) -> List[int]:
    if keep == size:
        return list(range(size))
    return top_k(scores[key] if layer is None else scores[key][layer], keep)


def _attention_layer(old: ModelConfig, new: ModelConfig, scores, layer: int, residual: bool):
    """(kept groups, kept heads, fold pairs) of one layer."""
    n_old = old.num_attention_heads // old.num_query_groups
    n_new = new.num_attention_heads // new.num_query_groups
    if n_old == 1 and new.num_query_groups < old.num_query_groups:
        # MHA: a group is a head; rank them by head score (what the estimator measures best).
        key = "attn.head" if "attn.head" in scores else "attn.group"
        kept = top_k(scores[key][layer], new.num_query_groups)
        return kept, list(kept), []
    groups = _keep_axis(scores, "attn.group", old.num_query_groups, new.num_query_groups, layer)
    heads, folds = [], []
    for g in groups:
        members = list(range(g * n_old, (g + 1) * n_old))
        if n_new == n_old:
            heads += members
            continue
        order = [members[j] for j in _rank(scores["attn.head"][layer][members])]
        heads += sorted(order[:n_new])
        folds += fold_pairs(order, n_new) if residual else []
    return groups, heads, folds


def fold_pairs(order: List[int], keep: int) -> List[Tuple[int, int]]:
    """The paper's residual rule, head_i <- head_i + (head_i - head_{2K-i+1}) for the last kept
    heads i (1-based, heads ordered by importance, L heads, K kept): the least important kept
    head absorbs the most important pruned one, and so on while pruned heads remain."""
    total, pairs = len(order), []
    for i in range(max(1, 2 * keep - total + 1), keep + 1):
        pairs.append((order[i - 1], order[2 * keep - i]))  # order[2K-i] is head_{2K-i+1}
    return pairs


def _kept_layers(old, new, scores, drop_layers, metric) -> List[int]:
    if drop_layers is not None:
        return [i for i in range(old.num_layers) if i not in set(drop_layers)]
    if new.num_layers == old.num_layers:
        return list(range(old.num_layers))
    if metric == "contiguous":
        return _contiguous_keep(scores["depth.contiguous"], old.num_layers, old.num_layers - new.num_layers)
    return top_k(scores[f"depth.{metric}"], new.num_layers)


def _contiguous_keep(block_scores: torch.Tensor, num_layers: int, drop: int) -> List[int]:
    """Drop `drop / k` non-overlapping k-layer blocks, cheapest first (score = loss increase
    when the block is removed, so smaller = safer to drop)."""
    k = num_layers - block_scores.numel() + 1
    if drop % k:
        raise ConfigError(f"depth_metric=contiguous scores blocks of {k} layers; it cannot drop {drop} "
                          f"layers (use a multiple of {k}, another metric or drop_layers)")
    dropped: set = set()
    for start in torch.sort(block_scores.double(), stable=True).indices.tolist():
        block = set(range(start, start + k))
        if not block & dropped:
            dropped |= block
        if len(dropped) == drop:
            break
    return [i for i in range(num_layers) if i not in dropped]


def expert_ranking(scores: Dict[str, torch.Tensor], metric: str) -> torch.Tensor:
    """[L, E] scores ranking routed experts by `prune.expert_metric` (config/prune.py)."""
    ranking = scores[EXPERT_METRICS[metric][0]].double()
    for key in EXPERT_METRICS[metric][1:]:
        ranking = ranking * scores[key].double()
    return ranking


def _needed_keys(old, new, scores, drop_layers, metric, expert_metric="contribution") -> List[str]:
    keys = []
    if old.is_moe:
        if new.num_moe_experts < old.num_moe_experts:
            if expert_metric not in EXPERT_METRICS:
                raise ConfigError(f"prune.expert_metric={expert_metric!r} is not one of {list(EXPERT_METRICS)}")
            keys += EXPERT_METRICS[expert_metric]
        if new.moe_ffn_hidden_size < old.moe_ffn_hidden_size:
            keys.append("moe.expert_neuron")
        if (old.moe_shared_expert_intermediate_size or 0) > (new.moe_shared_expert_intermediate_size or 0):
            keys.append("moe.shared_neuron")
    if new.num_query_groups < old.num_query_groups and old.num_attention_heads == old.num_query_groups:
        keys.append("attn.group" if "attn.group" in scores and "attn.head" not in scores else "attn.head")
    if new.hidden_size < old.hidden_size:
        keys.append("hidden.channel")
    if new.ffn_hidden_size < old.ffn_hidden_size:
        keys.append("mlp.neuron")
    if new.num_query_groups < old.num_query_groups and old.num_attention_heads != old.num_query_groups:
        keys.append("attn.group")
    if new.num_attention_heads // new.num_query_groups < old.num_attention_heads // old.num_query_groups:
        keys.append("attn.head")
    if new.num_layers < old.num_layers and drop_layers is None:
        if metric not in DEPTH_METRICS:
            raise ConfigError(f"prune.depth_metric={metric!r} is not one of {list(DEPTH_METRICS)}")
        keys.append(f"depth.{metric}")
    return keys


def score_shapes(model_cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Expected shape of every score tensor (contiguous: any block length k >= 1)."""
    c = model_cfg.resolved()
    shapes = {"attn.head": (c.num_layers, c.num_attention_heads), "attn.group": (c.num_layers, c.num_query_groups),
              "mlp.neuron": (c.num_layers, c.ffn_hidden_size), "hidden.channel": (c.hidden_size,),
              "depth.block_importance": (c.num_layers,), "depth.loss_drop": (c.num_layers,)}
    if c.is_moe:
        del shapes["mlp.neuron"]  # every layer's MLP is a MoELayer
        layers, experts, width = c.num_layers, c.num_moe_experts, c.moe_ffn_hidden_size
        shapes.update({"moe.expert": (layers, experts), "moe.expert_frequency": (layers, experts),
                       "moe.expert_neuron": (layers, experts, width), "moe.neuron": (layers, width)})
        if c.moe_shared_expert_intermediate_size is not None:
            shapes["moe.shared_neuron"] = (layers, c.moe_shared_expert_intermediate_size)
    return shapes


def check_scores(model_cfg: ModelConfig, scores: Dict[str, torch.Tensor], needed: List[str]) -> None:
    """Every needed score present with the model's shape, else one ConfigError."""
    c = model_cfg.resolved()
    rows = 2 * c.num_layers + 1  # the per-norm rows of trim/hidden.py (stored by the importance stage only)
    shapes = {**score_shapes(model_cfg), "hidden.channel_by_norm": (rows, c.hidden_size),
              "hidden.norm_moments": (rows, 2, c.hidden_size)}
    problems = []
    for key in needed:
        if key not in scores:
            problems.append(f"the importance scores lack {key!r}, needed for this target")
        elif key in shapes and tuple(scores[key].shape) != shapes[key]:
            problems.append(f"score {key!r} has shape {tuple(scores[key].shape)}, expected {shapes[key]}")
        elif key == "depth.contiguous" and not 1 <= scores[key].numel() <= model_cfg.resolved().num_layers:
            problems.append(f"score 'depth.contiguous' has {scores[key].numel()} blocks for "
                            f"{model_cfg.resolved().num_layers} layers")
    if problems:
        raise ConfigError(problems)
