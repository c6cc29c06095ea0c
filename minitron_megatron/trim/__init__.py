"""Trimming: validate a target -> pure TrimPlan (global indices) -> sharded apply -> run dir.

```
new_cfg = validate_target(model_cfg, target, tp, pp, pp_layout, padded_vocab)   # all problems at once
plan    = plan_from_scores(model_cfg, new_cfg, scores, depth_metric=..., residual_heads=...)
result  = apply_plan(model, plan, model_cfg, ctx, parallel, padded_vocab, pp_layout)
save_trimmed(run_dir, result, plan, padded_vocab, tokenizer, ctx, summary)
```
`trim_stage` runs the whole stage for the `prune` command (`check_trim_settings` validates
it up front). These two and `make_plan` are imported lazily: they pull in the data stack
and Megatron-core, which must be imported only after the runtime has set up CPU support.
"""

from minitron_megatron.trim.apply import TrimResult, apply_plan
from minitron_megatron.trim.plan import TrimPlan, keep_plan, plan_from_scores
from minitron_megatron.trim.save import PLAN_JSON, read_plan, save_trimmed
from minitron_megatron.trim.scores import load_scores, magnitude_scores, random_scores
from minitron_megatron.trim.validate import resolve_budget, validate_target

__all__ = [
    "PLAN_JSON",
    "TrimPlan",
    "TrimResult",
    "apply_plan",
    "keep_plan",
    "load_scores",
    "magnitude_scores",
    "make_plan",
    "plan_from_scores",
    "random_scores",
    "read_plan",
    "resolve_budget",
    "save_trimmed",
    "trim_stage",
    "validate_target",
]


def __getattr__(name):
    if name in ("check_trim_settings", "make_plan", "trim_stage"):
        from minitron_megatron.trim import stage

        return getattr(stage, name)
    raise AttributeError(name)
