"""Iterative rounds: the budget of each round, and each round's directory, start and teacher.

Round r (1-based, of k) prunes the previous round's best student (round 1: the teacher) to
its budget and distils it, so the target is reached in k smaller steps (the paper's practice
of pruning from the model closest to the target). Budgets are absolute parameter counts.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List

from minitron_megatron.config.search import ROUND_TEACHERS, SearchConfig


@dataclass
class Round:
    number: int
    """1-based."""
    budget: int
    """Target parameter count (absolute)."""
    dir: Path
    """The round's search dir: the search's `save` for a single round, else save/rounds/<number>."""


def absolute(budget: float, teacher_params: int) -> int:
    """A budget as a parameter count: a fraction (<= 1) of the teacher, or a count (> 1)."""
    return int(round(budget * teacher_params)) if budget <= 1 else int(budget)


def round_budgets(search: SearchConfig, teacher_params: int) -> List[int]:
    """Each round's budget, largest first; the last is the target.

    With `search.rounds=k` the budgets shrink geometrically (every round removes the same share
    of what is left): target_fraction^(r/k) of the teacher for r = 1..k."""
    if search.round_budgets:
        return [absolute(b, teacher_params) for b in search.round_budgets]
    fraction = absolute(search.param_budget, teacher_params) / teacher_params
    k = max(search.rounds, 1)
    return [int(round(teacher_params * fraction ** (r / k))) for r in range(1, k + 1)]


def budget_problems(search: SearchConfig, teacher_params: int, unit: str = "parameters") -> List[str]:
    """Every problem with the budget, rounds and tolerance settings (`teacher_params`: the
    teacher's count of `search.budget_kind`, named `unit` in messages)."""
    problems = []
    if not 0 <= search.tolerance < 1:
        problems.append(f"search.tolerance={search.tolerance} must be in [0, 1)")
    if search.rounds < 1:
        problems.append(f"search.rounds={search.rounds} must be >= 1")
    if search.round_teacher not in ROUND_TEACHERS:
        problems.append(f"search.round_teacher={search.round_teacher!r} is not one of {list(ROUND_TEACHERS)}")
    setting = "search.round_budgets" if search.round_budgets else "search.param_budget"
    raw = search.round_budgets or [search.param_budget]
    if any(b <= 0 for b in raw):
        return problems + [f"{setting}={raw} must be positive (a fraction of the teacher, or a count > 1)"]
    budgets = round_budgets(search, teacher_params)
    above = [b for b in budgets if b > teacher_params]
    if above:
        problems.append(f"{setting}={raw} asks for {above[0]:,} {unit}, above the teacher's {teacher_params:,}"
                        + (f" {unit} (search.budget_kind=active counts the parameters one token uses)"
                           if search.budget_kind == "active" else ""))
    if any(later > earlier for earlier, later in zip(budgets, budgets[1:])):
        problems.append(f"search.round_budgets={raw} must not grow from one round to the next")
    return problems


def plan_rounds(search: SearchConfig, teacher_params: int, save: Path) -> List[Round]:
    """The rounds' budgets and directories."""
    budgets = round_budgets(search, teacher_params)
    if len(budgets) == 1:
        return [Round(1, budgets[0], save)]
    return [Round(r, b, save / "rounds" / str(r)) for r, b in enumerate(budgets, start=1)]
