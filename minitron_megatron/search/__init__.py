"""Architecture search: candidate enumeration, per-candidate light KD, ranking, iterative rounds.

    space.py      search.space -> architectures (sizes scaled from the teacher)
    plan.py       architectures -> the round's candidates (exact parameter budget, TP/PP fit), or
                  one ConfigError naming the nearest feasible architectures
    candidate.py  one candidate: prune (scores reused) -> zero-shot -> distil -> score, resumable
    rounds.py     the budgets of iterative rounds and where each round starts
    report.py     candidates.json, report.md, kd_curves.png, summary.json
    command.py    `python -m minitron_megatron.search` (`search(cfg, ctx)`)

Nothing here imports Megatron at import time (`__main__` imports this package before the
runtime has chosen the device).
"""
