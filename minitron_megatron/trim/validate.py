"""Trim targets: check everything before any work, and resolve a parameter budget to widths.

`validate_target` returns the pruned architecture (a resolved `ModelConfig`) or raises one
`ConfigError` that lists every problem, so a user fixes a bad target in one go.

Attention rules (GQA, `n = heads / groups` query heads per group):
- pruning query heads keeps every group and the same count per group (`n' = heads' / groups`);
- pruning groups drops whole groups with their K/V heads and keeps `n` heads in each survivor;
- both at once: `groups'` groups of `heads' / groups'` heads each, so `n' <= n`;
- multi-head attention (`n = 1`) stays multi-head: heads and groups move together.
`kv_channels` (the head dim) is never changed: the target has no field for it and the pruned
config stores the resolved value, so a model whose head dim was derived from hidden_size
keeps it when hidden_size shrinks.

Parameter budget rule (`param_budget=b`, a fraction of the original count, embeddings
included): heads, groups and layers are applied first when also given; then
1. `ffn_hidden_size` shrinks in steps of lcm(8, tp) down to `hidden_size`;
2. then `hidden_size` shrinks in steps of 8 with `ffn_hidden_size` following it down;
the first (largest) architecture on that path with at most `b` x the original parameters
wins. MLP neurons go first because the paper finds them the cheapest width to remove
relative to their share of parameters, and hidden channels last because they touch every layer.
"""

import math
from dataclasses import replace
from typing import Iterator, List, Optional

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import TrimTarget
from minitron_megatron.errors import ConfigError
from minitron_megatron.model.params import parameter_count
from minitron_megatron.runtime.parallel_rules import pipeline_problems, tensor_parallel_problems

WIDTH_FIELDS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "num_layers")
MOE_FIELDS = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")


def validate_target(model_cfg: ModelConfig, target: TrimTarget, tp: int = 1, pp: int = 1,
                    pp_layout: Optional[List[int]] = None, padded_vocab: Optional[int] = None,
                    ep: int = 1) -> ModelConfig:
    """The pruned architecture for `target`, or a ConfigError listing every violation."""
    old = model_cfg.resolved()
    problems = (_range_problems(old, target) + _layer_problems(old, target) + _budget_problems(target)
                + _moe_problems(old, target, tp, ep))
    valid = _in_range(old, target)  # derived checks see only in-range values: no follow-on noise
    heads, groups = _attention_sizes(old, valid)
    num_layers = valid.num_layers or old.num_layers - len(set(valid.drop_layers or []))
    new = replace(old, num_attention_heads=heads, num_query_groups=groups, num_layers=num_layers,
                  hidden_size=valid.hidden_size or old.hidden_size,
                  ffn_hidden_size=valid.ffn_hidden_size or old.ffn_hidden_size,
                  **{name: getattr(valid, name) or getattr(old, name) for name in MOE_FIELDS if old.is_moe})
    problems += _attention_problems(old, new) + _parallel_problems(new, tp, pp, pp_layout, padded_vocab)
    if problems:
        raise ConfigError(problems)
    if target.param_budget is not None:
        new = resolve_budget(old, new, target.param_budget, tp, padded_vocab)
    return new


def _range_problems(old: ModelConfig, target: TrimTarget) -> List[str]:
    problems = []
    for name in WIDTH_FIELDS:
        value = getattr(target, name)
        if value is not None and not 1 <= value <= getattr(old, name):
            problems.append(f"prune.target.{name}={value} must be between 1 and the original "
                            f"model.{name}={getattr(old, name)}")
    return problems


def _in_range(old: ModelConfig, target: TrimTarget) -> TrimTarget:
    """`target` with out-of-range sizes and unusable drop lists unset."""
    fixed = {name: None for name in WIDTH_FIELDS + MOE_FIELDS
             if getattr(target, name) is not None
             and not 1 <= getattr(target, name) <= (getattr(old, name) or 0)}
    if target.drop_layers is not None and _layer_problems(old, replace(target, num_layers=None)):
        fixed["drop_layers"] = None
    return replace(target, **fixed)


def _layer_problems(old: ModelConfig, target: TrimTarget) -> List[str]:
    drop = target.drop_layers
    if drop is None:
        return []
    problems = []
    bad = sorted({i for i in drop if not 0 <= i < old.num_layers})
    if bad:
        problems.append(f"prune.target.drop_layers has layers {bad} outside 0..{old.num_layers - 1}")
    if len(set(drop)) != len(drop):
        problems.append(f"prune.target.drop_layers={list(drop)} lists a layer twice")
    if len(set(drop)) >= old.num_layers:
        problems.append(f"prune.target.drop_layers={list(drop)} would drop every layer")
    if target.num_layers is not None and target.num_layers != old.num_layers - len(set(drop)):
        problems.append(f"prune.target.num_layers={target.num_layers} disagrees with prune.target.drop_layers "
                        f"({old.num_layers} - {len(set(drop))} layers); set only one of them")
    return problems


def _moe_problems(old: ModelConfig, target: TrimTarget, tp: int, ep: int) -> List[str]:
    """Mixture-of-experts targets: the model must have what they cut, and EP (TP for the shared
    expert) must split the result."""
    given = [name for name in MOE_FIELDS if getattr(target, name) is not None]
    if not old.is_moe:
        return [f"prune.target.{name} needs a mixture-of-experts model (model.num_moe_experts is not set)"
                for name in given]
    problems = []
    if target.ffn_hidden_size is not None:
        problems.append("prune.target.ffn_hidden_size: every layer of a mixture-of-experts model is MoE (no "
                        "dense MLP); cut prune.target.moe_ffn_hidden_size (routed experts) or "
                        "moe_shared_expert_intermediate_size")
    if target.param_budget is not None:
        # Refused rather than resolved: a MoE budget has two meanings (total or active per token)
        # and four widths to trade, which the search (search.budget_kind) explores by measurement.
        shared = "/ moe_shared_expert_intermediate_size " if old.moe_shared_expert_intermediate_size else ""
        problems.append("prune.target.param_budget is for dense models; on a mixture-of-experts model give "
                        f"prune.target.num_moe_experts / moe_ffn_hidden_size {shared}/ hidden_size (and heads, "
                        "layers) explicitly, or let `search` pick them within a budget of total or active "
                        "parameters (search.param_budget, search.budget_kind=total|active)")
    for name in given:
        value, limit = getattr(target, name), getattr(old, name)
        if limit is None:
            problems.append(f"prune.target.{name}={value}: the model has no shared expert "
                            "(model.moe_shared_expert_intermediate_size is not set)")
        elif not 1 <= value <= limit:
            problems.append(f"prune.target.{name}={value} must be between 1 and the original model.{name}={limit}")
    experts = target.num_moe_experts
    if experts is not None and 1 <= experts <= old.num_moe_experts:
        feasible = [n for n in range(old.moe_router_topk, old.num_moe_experts + 1) if n % ep == 0]
        if experts % ep or experts < old.moe_router_topk:
            problems.append(f"prune.target.num_moe_experts={experts} is not feasible with parallel.ep={ep} and "
                            f"model.moe_router_topk={old.moe_router_topk} (every EP rank holds the same number of "
                            f"experts; the router picks top-{old.moe_router_topk}); feasible counts: {feasible}")
    shared = target.moe_shared_expert_intermediate_size
    if shared is not None and old.moe_shared_expert_intermediate_size and shared % tp:
        problems.append(f"parallel.tp={tp} does not divide prune.target.moe_shared_expert_intermediate_size="
                        f"{shared} (the shared expert is split over TP like a dense MLP)")
    return problems


def _budget_problems(target: TrimTarget) -> List[str]:
    budget = target.param_budget
    if budget is None:
        return []
    problems = []
    if not 0 < budget <= 1:
        problems.append(f"prune.target.param_budget={budget} must be a fraction in (0, 1]")
    for name in ("hidden_size", "ffn_hidden_size"):
        if getattr(target, name) is not None:
            problems.append(f"prune.target.param_budget sets hidden_size and ffn_hidden_size itself; "
                            f"unset prune.target.{name}")
    return problems


def _attention_sizes(old: ModelConfig, target: TrimTarget):
    """(heads, groups) after pruning, following the GQA rules in the module docstring."""
    heads, groups = target.num_attention_heads, target.num_query_groups
    per_group = old.num_attention_heads // old.num_query_groups
    if per_group == 1 and (heads is None) != (groups is None):  # MHA stays MHA
        return (heads or groups), (heads or groups)
    if groups is None:
        return heads or old.num_attention_heads, old.num_query_groups
    return heads or groups * per_group, groups


def _attention_problems(old: ModelConfig, new: ModelConfig) -> List[str]:
    heads, groups = new.num_attention_heads, new.num_query_groups
    if heads % groups:
        return [f"prune.target.num_attention_heads={heads} must be a multiple of the pruned "
                f"num_query_groups={groups} (every group keeps the same number of query heads)"]
    per_group, old_per_group = heads // groups, old.num_attention_heads // old.num_query_groups
    if per_group > old_per_group:
        return [f"{heads} heads in {groups} query groups is {per_group} heads per group, more than the "
                f"original {old_per_group}: heads are pruned within groups and groups only as a whole"]
    return []


def _parallel_problems(new: ModelConfig, tp: int, pp: int, pp_layout, padded_vocab) -> List[str]:
    return (tensor_parallel_problems(new, tp, padded_vocab, subject="the pruned ")
            + pipeline_problems(new.num_layers, pp, pp_layout, subject="the pruned "))


def resolve_budget(old: ModelConfig, new: ModelConfig, budget: float, tp: int,
                   padded_vocab: Optional[int] = None) -> ModelConfig:
    """The largest architecture on the budget path (module docstring) within `budget`."""
    limit = budget * parameter_count(old, padded_vocab)
    for candidate in _budget_path(new, tp):
        if parameter_count(candidate, padded_vocab) <= limit:
            return candidate
    smallest = parameter_count(list(_budget_path(new, tp))[-1], padded_vocab)
    raise ConfigError(f"prune.target.param_budget={budget} is below the smallest width this rule reaches "
                      f"({smallest / parameter_count(old, padded_vocab):.3f} of the original); prune "
                      "heads, groups or layers as well, or raise the budget")


def _budget_path(start: ModelConfig, tp: int) -> Iterator[ModelConfig]:
    step = 8 * tp // math.gcd(8, tp)
    hidden, ffn = start.hidden_size, start.ffn_hidden_size
    while True:  # 1. neurons, down to the hidden size
        yield replace(start, hidden_size=hidden, ffn_hidden_size=ffn)
        if ffn - step < max(hidden, step):
            break
        ffn -= step
    while hidden > 8:  # 2. hidden channels, ffn following them down
        hidden -= 8
        ffn = min(ffn, max(step, hidden // step * step))
        yield replace(start, hidden_size=hidden, ffn_hidden_size=ffn)
