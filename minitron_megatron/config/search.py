"""`search` settings: the architecture search of the paper's section 4 (and iterative rounds).

Every architecture of `search.space` (the product of its per-axis values) that the
teacher can be pruned to and whose EXACT parameter count (`search.budget_kind`: total, or
active per token for a mixture of experts) is within `search.tolerance` of the budget is a
candidate. Each candidate is pruned (one importance run serves all
of them), scored zero-shot, distilled for `search.steps` steps and scored again; the
candidates are ranked by that last validation loss.
"""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class SearchSpace:
    """Per-axis values as fractions of the ORIGINAL teacher (1.0 = unchanged).

    The defaults are the paper's Table 9 (Nemotron-4 15B: 32 layers, 48 heads, hidden
    6144, ffn 4 x 6144) expressed as fractions, so they scale to any teacher; on that
    teacher they contain Minitron-8B and Minitron-4B. Sizes are rounded to the nearest
    integer (layers, heads, groups) or to the nearest multiple of `search.width_multiple`
    (hidden, ffn); duplicates after rounding count once.
    """

    num_layers: List[float] = field(default_factory=lambda: [1.0, 0.96875, 0.9375, 0.90625])
    """Paper: 29-32 layers of 32."""
    num_attention_heads: List[float] = field(default_factory=lambda: [1.0, 0.666667, 0.5])
    """Paper: {24, 32, 48} heads of 48."""
    num_query_groups: List[float] = field(default_factory=lambda: [1.0])
    """The paper keeps the teacher's query groups."""
    ffn_ratio: List[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625])
    """The MLP expansion (ffn_hidden_size / hidden_size) as a fraction of the teacher's, applied
    to each candidate's hidden size (capped at the teacher's ffn). Paper: {2.5, 3, 3.5, 4} x
    hidden with a 4x teacher."""
    hidden_size: List[float] = field(default_factory=lambda: [1.0, 0.916667, 0.833333, 0.75, 0.666667,
                                                              0.583333, 0.5, 0.416667])
    """Paper: embedding 2560-6144 of 6144 (here in steps of 512 on that teacher)."""
    num_moe_experts: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    """Mixture-of-experts teachers only (dense ones ignore the three moe axes): routed experts
    per layer, rounded to an integer; counts below `moe_router_topk`, or that `parallel.ep` does
    not divide, are left out of the space."""
    moe_ffn_hidden_size: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    """Width of every routed expert's FFN, a fraction of the teacher's (rounded to
    `search.width_multiple`). It replaces `ffn_ratio`, which a MoE model (no dense MLP) ignores."""
    moe_shared_expert_intermediate_size: List[float] = field(default_factory=lambda: [1.0])
    """Width of the shared expert (teachers that have one), a fraction of the teacher's."""


ROUND_TEACHERS = ("original", "previous")
BUDGET_KINDS = ("total", "active")


@dataclass
class SearchConfig:
    param_budget: float = 0.5
    """The target size: a fraction of the teacher's parameters (<= 1) or an absolute count (> 1), of
    the kind `budget_kind` names."""
    budget_kind: str = "total"
    """What the budget counts: total (every parameter) or active (the parameters one token uses:
    embeddings, output layer, attention, norms, router, shared expert and `moe_router_topk` of the
    routed experts, i.e. routed experts count topk / num_moe_experts of their weights). On a
    dense model both are the same count. Fractions are of the teacher's count of that kind."""
    tolerance: float = 0.05
    """Candidates' exact parameter counts lie within budget x (1 +- tolerance) (paper: 5%)."""
    space: SearchSpace = field(default_factory=SearchSpace)
    width_multiple: int = 8
    """hidden_size and ffn_hidden_size of a candidate are multiples of this."""
    steps: int = 400
    """Distillation steps per candidate (paper: 400; rankings settle after ~300). The other loop
    keys are `distill.*`."""
    candidate: Optional[int] = None
    """Evaluate only this candidate (0-based, as listed in candidates.json) and stop: one job of a
    Hydra multirun or SLURM array. None: evaluate every unfinished candidate, then rank them all."""
    list_candidates: bool = False
    """Print the candidates (index, architecture, exact parameters, skipped or not) and stop, with
    nothing written: e.g. to size a SLURM array of `search.candidate` jobs."""
    rounds: int = 1
    """Reach the budget in this many prune -> distil rounds, each starting from the previous round's
    best student, with budgets spaced geometrically (budget^(r/rounds) of the teacher)."""
    round_budgets: Optional[List[float]] = None
    """Explicit budgets per round (fractions of the original teacher, or absolute counts), largest
    first. Overrides `rounds`, and its last entry is the target (`param_budget` is then unused)."""
    round_teacher: str = "original"
    """Teacher of rounds after the first: original (the `load` model) or previous (the previous
    round's best student)."""
    nearest: int = 5
    """How many nearest feasible architectures a 'no candidate' error lists."""
