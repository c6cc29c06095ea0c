"""Write a pruned model as a run directory that every command loads at any TP/PP.

```
RUN/
  model.yaml        the pruned architecture (resolved: kv_channels, groups explicit) + vocab
  tokenizer.model   the teacher's tokenizer (unchanged by pruning)
  trim_plan.json    kept global indices of the original model (TrimPlan)
  checkpoint/       Megatron dist checkpoint, iteration 1, model only (global offsets: reshardable)
  summary.json      written last: params_before, params_after, val_loss, ...
```
"""

from pathlib import Path
from typing import Optional

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.checkpoint.megatron_lm import checkpoint_args
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.runtime.faults import fault_point
from minitron_megatron.trim.apply import TrimResult
from minitron_megatron.trim.plan import TrimPlan

PLAN_JSON = "trim_plan.json"
CHECKPOINT_ITERATION = 1
"""Megatron-LM refuses a tracker file that says 0 (`assert iteration > 0 or release`)."""


def save_trimmed(run_dir, result: TrimResult, plan: TrimPlan, padded_vocab: int,
                 tokenizer_path: Optional[str], ctx: ParallelContext, summary: dict,
                 origin: Optional[str] = None, seq_length: Optional[int] = None) -> Path:
    """Collectively save the pruned model; summary.json is the commit point, written last.
    `origin` is the source run dir (its HF import config carries over, see run_dir.HF_CONFIG);
    `seq_length` the prune run's (recorded: later commands on the pruned model default to it)."""
    run_dir = Path(run_dir)
    if ctx.is_main:
        rd.write_model_yaml(run_dir, result.model_cfg, padded_vocab, tokenizer_path, origin=origin,
                            seq_length=seq_length)
        rd.atomic_write_text(run_dir / PLAN_JSON, plan.to_json() + "\n")
    ctx.barrier()
    args = checkpoint_args(result.model_cfg, padded_vocab, ctx.tp_size, ctx.pp_size, iteration=CHECKPOINT_ITERATION,
                           tokenizer_path=tokenizer_path, seq_length=seq_length)
    ckpt.save_checkpoint(rd.checkpoint_root(run_dir), CHECKPOINT_ITERATION, result.model, ctx,
                         extra={"trim": {"method": plan.method, "source": plan.source}}, args=args)
    fault_point("trim.save")
    if ctx.is_main:
        rd.write_summary(run_dir, summary)
    ctx.barrier()
    return run_dir


def read_plan(run_dir) -> TrimPlan:
    return TrimPlan.from_json((Path(run_dir) / PLAN_JSON).read_text())
