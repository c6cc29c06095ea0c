"""`search.space` -> architectures: fractions scaled to the ORIGINAL teacher's sizes.

An architecture is a dict of TrimTarget sizes, all explicit: the five of `AXES` for a dense
teacher; for a mixture of experts (every layer MoE, no dense MLP) `MOE_AXES`, i.e. ffn_hidden_size
replaced by the routed experts' count and width (and the shared expert's width when the teacher
has one). Scaling from the original teacher (not from a round's starting model) keeps one family
of architectures across iterative rounds. The dense MLP axis is an expansion ratio, as in the
paper's Table 9: a candidate's ffn_hidden_size follows its own hidden size; the expert axes are
plain fractions of the teacher's sizes.
"""

import itertools
from dataclasses import fields
from typing import Dict, List

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import TrimTarget
from minitron_megatron.config.search import SearchSpace

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
MOE_AXES = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "num_moe_experts",
            "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
SHORT = {"num_layers": "layers", "hidden_size": "hidden", "ffn_hidden_size": "ffn", "num_attention_heads": "heads",
         "num_query_groups": "groups", "num_moe_experts": "experts", "moe_ffn_hidden_size": "expert_ffn",
         "moe_shared_expert_intermediate_size": "shared_ffn"}

Arch = Dict[str, int]


def space_problems(space: SearchSpace, width_multiple: int) -> List[str]:
    """Every malformed `search.space.*` list (empty, or a fraction outside (0, 1])."""
    problems = [] if width_multiple >= 1 else [f"search.width_multiple={width_multiple} must be >= 1"]
    for f in fields(space):
        values = getattr(space, f.name)
        if not values:
            problems.append(f"search.space.{f.name} is empty; list at least one fraction (1.0 keeps the size)")
        bad = [v for v in values if not 0 < v <= 1]
        if bad:
            problems.append(f"search.space.{f.name} has {bad}: fractions of the teacher's must be in (0, 1]")
    return problems


def _scaled(value: float, unit: int, cap: int) -> int:
    """`value` rounded to a multiple of `unit`, at least one unit, at most `cap`."""
    return min(cap, max(unit, round(value / unit) * unit))


def _sizes(fractions: List[float], full: int, unit: int) -> List[int]:
    return sorted({_scaled(f * full, unit, full) for f in fractions}, reverse=True)


def architectures(teacher: ModelConfig, space: SearchSpace, width_multiple: int) -> List[Arch]:
    """Every combination of the axes' sizes, largest first (not yet checked against any rule)."""
    t = teacher.resolved()
    layers = _sizes(space.num_layers, t.num_layers, 1)
    heads = _sizes(space.num_attention_heads, t.num_attention_heads, 1)
    groups = _sizes(space.num_query_groups, t.num_query_groups, 1)
    hidden = _sizes(space.hidden_size, t.hidden_size, width_multiple)
    if t.is_moe:
        return _moe_architectures(t, space, width_multiple, layers, hidden, heads, groups)
    ratio = t.ffn_hidden_size / t.hidden_size
    seen, archs = set(), []
    for n, h, f, a, g in itertools.product(layers, hidden, space.ffn_ratio, heads, groups):
        arch = {"num_layers": n, "hidden_size": h,
                "ffn_hidden_size": _scaled(f * ratio * h, width_multiple, t.ffn_hidden_size),
                "num_attention_heads": a, "num_query_groups": g}
        key = tuple(arch.values())
        if key not in seen:  # two ratios can round to one ffn size
            seen.add(key)
            archs.append(arch)
    return archs


def _moe_architectures(t: ModelConfig, space: SearchSpace, width_multiple: int, layers, hidden, heads,
                       groups) -> List[Arch]:
    """The MoE axes: expert count (integers), expert and shared-expert widths (width_multiple)."""
    experts = _sizes(space.num_moe_experts, t.num_moe_experts, 1)
    expert_ffn = _sizes(space.moe_ffn_hidden_size, t.moe_ffn_hidden_size, width_multiple)
    shared = t.moe_shared_expert_intermediate_size
    shared_ffn = _sizes(space.moe_shared_expert_intermediate_size, shared, width_multiple) if shared else [None]
    archs = []
    for values in itertools.product(layers, hidden, heads, groups, experts, expert_ffn, shared_ffn):
        arch = dict(zip(MOE_AXES, values))
        if shared is None:
            del arch["moe_shared_expert_intermediate_size"]
        archs.append(arch)
    return archs


def to_target(arch: Arch) -> TrimTarget:
    """The prune target of an architecture (every size explicit)."""
    return TrimTarget(**arch)


def describe(arch: Arch) -> str:
    """`layers=4 hidden=48 ffn=96 heads=4 groups=2` (a MoE one: `... experts=6 expert_ffn=96`):
    one line in tables and messages."""
    return " ".join(f"{SHORT[a]}={arch[a]}" for a in SHORT if a in arch)
