"""The candidates of one round: architectures the start model prunes to, within the budget.

1. `space.architectures` (scaled from the original teacher);
2. kept if the round's START model can be pruned to it at all (`validate_target` at TP=1, PP=1
   and the run's EP: sizes in range, the GQA rules, an expert count EP divides and >= top-k),
   with its EXACT parameter counts, total and active per token (`model/params.py`);
3. kept if its count of `search.budget_kind` is within `search.tolerance` of the budget: these
   are the candidates, largest first (index = position: every job of a multirun lists the same
   candidates);
4. a candidate that the chosen TP/PP cannot split is kept as `skipped: <reason>`.
No candidate after 3, or none left after 4, is one ConfigError listing the nearest feasible
architectures by parameter count.
"""

from dataclasses import dataclass
from typing import List, Optional

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.search import SearchConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.model.params import active_parameter_count, parameter_count
from minitron_megatron.search.space import Arch, architectures, describe, to_target
from minitron_megatron.trim.validate import validate_target


@dataclass
class Candidate:
    index: int
    arch: Arch
    params: int
    """Exact parameter count of the pruned model (padded vocab included, as every summary counts)."""
    skipped: Optional[str] = None
    """Why the chosen TP/PP cannot split it (the ConfigError text); None: it is evaluated."""
    active_params: Optional[int] = None
    """Exact parameters used per token (== params for a dense model); None means params."""


@dataclass
class Feasible:
    arch: Arch
    params: int
    split_problem: Optional[str]
    """None when the chosen TP/PP splits it."""
    active: int
    """Exact parameters used per token (== params for a dense model)."""

    def count(self, kind: str) -> int:
        """The count `search.budget_kind` measures."""
        return self.active if kind == "active" else self.params


def feasible_architectures(start: ModelConfig, teacher: ModelConfig, search: SearchConfig, padded_vocab: int,
                           tp: int, pp: int, ep: int = 1) -> List[Feasible]:
    """Every architecture of the space that `start` can be pruned to at this EP, with its exact sizes."""
    found = []
    for arch in architectures(teacher, search.space, search.width_multiple):
        try:
            new_cfg = validate_target(start, to_target(arch), 1, 1, None, padded_vocab, ep=ep)
        except ConfigError:
            continue  # not in this start model's reach (larger, against the GQA rules, experts EP cannot split)
        try:
            validate_target(start, to_target(arch), tp, pp, None, padded_vocab, ep=ep)
            problem = None
        except ConfigError as err:
            problem = "; ".join(err.problems)
        found.append(Feasible(arch, parameter_count(new_cfg, padded_vocab), problem,
                              active_parameter_count(new_cfg, padded_vocab)))
    return found


def plan_candidates(start: ModelConfig, teacher: ModelConfig, teacher_params: int, budget: int,
                    search: SearchConfig, padded_vocab: int, tp: int, pp: int, ep: int = 1) -> List[Candidate]:
    """The round's candidates (module docstring), or a ConfigError naming the nearest feasible ones.
    `teacher_params` and `budget` count `search.budget_kind` (total or active parameters)."""
    feasible = feasible_architectures(start, teacher, search, padded_vocab, tp, pp, ep)
    kind = search.budget_kind
    low, high = budget * (1 - search.tolerance), budget * (1 + search.tolerance)
    within = sorted((f for f in feasible if low <= f.count(kind) <= high),
                    key=lambda f: (-f.count(kind), -f.params, [-f.arch[a] for a in f.arch]))
    if not within:
        raise ConfigError(no_candidate_message(
            f"no architecture of search.space is within search.tolerance={search.tolerance} of the budget",
            feasible, budget, teacher_params, search, tp, pp))
    if all(f.split_problem for f in within):
        reasons = sorted({f.split_problem for f in within})
        raise ConfigError(no_candidate_message(
            f"parallel.tp={tp} x parallel.pp={pp} cannot split any of the {len(within)} candidates "
            f"({'; '.join(reasons)})", feasible, budget, teacher_params, search, tp, pp))
    return [Candidate(i, f.arch, f.params, f.split_problem, f.active) for i, f in enumerate(within)]


def no_candidate_message(headline: str, feasible: List[Feasible], budget: int, teacher_params: int,
                         search: SearchConfig, tp: int, pp: int) -> str:
    """`headline`, the budget, and the architectures nearest to it (`nearest_lines`)."""
    unit = units(search.budget_kind)
    return "\n".join([f"search: {headline} {budget:,} {unit} ({budget / teacher_params:.3f} of the "
                      f"teacher's {teacher_params:,})"] + nearest_lines(feasible, budget, teacher_params,
                                                                        search.nearest, tp, pp,
                                                                        search.budget_kind))


def units(kind: str) -> str:
    return "active parameters" if kind == "active" else "parameters"


def nearest_lines(feasible: List[Feasible], budget: int, teacher_params: int, count: int, tp: int,
                  pp: int, kind: str = "total") -> List[str]:
    """The `count` architectures closest to `budget` (by the `kind` count) that this TP/PP can
    split, so the user can pick a budget, tolerance or space that works."""
    splittable = sorted((f for f in feasible if f.split_problem is None),
                        key=lambda f: (abs(f.count(kind) - budget), -f.count(kind)))[:count]
    if not splittable:
        return [f"no architecture of search.space can be split at parallel.tp={tp}, parallel.pp={pp}"]
    return ([f"nearest feasible architectures at parallel.tp={tp}, parallel.pp={pp}:"]
            + [f"  {describe(f.arch)}: {f.count(kind):,} {units(kind)} ({f.count(kind) / teacher_params:.3f})"
               + (f", {f.params:,} in all" if kind == "active" else "") for f in splittable])
