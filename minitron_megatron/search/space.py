"""`search.space` -> architectures: each axis' fractions scaled to the ORIGINAL teacher's sizes.

An architecture is a dict of the five TrimTarget sizes (`AXES`), all explicit. Scaling
from the original teacher (not from a round's starting model) keeps one family of
architectures across iterative rounds.
"""

import itertools
from dataclasses import fields
from typing import Dict, List

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import TrimTarget
from minitron_megatron.config.search import SearchSpace

AXES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
WIDTHS = ("hidden_size", "ffn_hidden_size")
"""Rounded to multiples of `search.width_multiple`; the other axes to whole units."""

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
            problems.append(f"search.space.{f.name} has {bad}: fractions of the teacher's size must be in (0, 1]")
    return problems


def axis_sizes(teacher: ModelConfig, space: SearchSpace, width_multiple: int) -> Dict[str, List[int]]:
    """Each axis' distinct sizes, largest first."""
    teacher = teacher.resolved()
    sizes = {}
    for name in AXES:
        full, unit = getattr(teacher, name), width_multiple if name in WIDTHS else 1
        # Never above the teacher's size, never below one unit.
        scaled = {min(full, max(unit, round(f * full / unit) * unit)) for f in getattr(space, name)}
        sizes[name] = sorted(scaled, reverse=True)
    return sizes


def architectures(teacher: ModelConfig, space: SearchSpace, width_multiple: int) -> List[Arch]:
    """Every combination of the axes' sizes (not yet checked against any rule)."""
    sizes = axis_sizes(teacher, space, width_multiple)
    return [dict(zip(AXES, combo)) for combo in itertools.product(*(sizes[a] for a in AXES))]


def to_target(arch: Arch) -> TrimTarget:
    """The prune target of an architecture (every size explicit)."""
    return TrimTarget(**arch)


def describe(arch: Arch) -> str:
    """`layers=4 hidden=48 ffn=96 heads=4 groups=2`: one line in tables and messages."""
    short = {"num_layers": "layers", "hidden_size": "hidden", "ffn_hidden_size": "ffn",
             "num_attention_heads": "heads", "num_query_groups": "groups"}
    return " ".join(f"{short[a]}={arch[a]}" for a in AXES)
