"""One candidate: prune (reusing the round's scores) -> zero-shot score -> distil K steps -> score.

```
ROUND/candidates/<i>/
  arch.json    the architecture this directory is for (a rerun with another space fails)
  pruned/      a `prune` run dir: its summary's val_loss is the zero-shot loss
  student/     a `distill` run dir: its summary's val_loss is the loss after search.steps
  failed.json  only when its distillation diverged (NaN/Inf): the candidate is reported as
               failed and the others are still ranked; delete the file to try it again
```
Resumable by the run dirs' own commit points: a complete student is reused; an unfinished
one is resumed by the training driver; a pruned dir without summary.json is removed and redone.
Both stages are the commands' library calls (`recipes.prune.prune`, `distill.loop.distill`)
in this process and runtime, like the `run` recipe's stages; they borrow the loaded teacher
(and round start) from the search's `ResidentModels`, and each is torn down before the next
(`train.teardown.release_stage`), so one candidate's model and optimizer never outlive it.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import DistillCommand, PruneCommand, SearchCommand, derived_common
from minitron_megatron.config.distill import ModelSource
from minitron_megatron.errors import ConfigError
from minitron_megatron.checkpoint.resident import ResidentModels
from minitron_megatron.runtime import clock
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.search.plan import Candidate
from minitron_megatron.search.space import to_target

ARCH_JSON = "arch.json"
FAILED_JSON = "failed.json"


def candidate_dir(round_dir: Path, index: int) -> Path:
    return Path(round_dir) / "candidates" / str(index)


def common(cfg: SearchCommand, **overrides) -> dict:
    """The CommonConfig keys of `cfg` (data, parallel, seed, device, seq_length, ...) for a
    candidate's stage, with overrides (see `derived_common`)."""
    return derived_common(cfg, **overrides)


def check_arch(round_dir: Path, cand: Candidate) -> None:
    """A candidate directory from an earlier run must be for the same architecture."""
    path = candidate_dir(round_dir, cand.index) / ARCH_JSON
    if path.is_file() and json.loads(path.read_text()) != cand.arch:
        raise ConfigError(f"{path.parent} holds candidate {cand.index} of a different search "
                          f"({json.loads(path.read_text())}, now {cand.arch}); keep search.* as it was, "
                          "or choose a new save directory")


def entry(cand: Candidate, round_dir: Path, teacher_params: int, teacher_active: Optional[int] = None) -> dict:
    """The candidate's line in candidates.json, from its run dirs as they are now. Both counts are
    exact: total and active per token (the same for a dense model), each as a fraction of the
    teacher's count of that kind."""
    active = cand.params if cand.active_params is None else cand.active_params
    out = {"index": cand.index, "arch": dict(cand.arch), "params": cand.params,
           "params_fraction": round(cand.params / teacher_params, 4), "active_params": active,
           "active_fraction": round(active / (teacher_active or teacher_params), 4),
           "zero_shot_loss": None, "val_loss": None,
           "kd_loss": None, "status": f"skipped: {cand.skipped}" if cand.skipped else "pending",
           "pruned": f"candidates/{cand.index}/pruned", "student": f"candidates/{cand.index}/student"}
    pruned = rd.read_summary(round_dir / out["pruned"])
    student = rd.read_summary(round_dir / out["student"])
    failed = read_failure(round_dir, cand.index)
    if pruned is not None:
        out["zero_shot_loss"] = pruned["val_loss"]
    if student is not None:
        out.update(val_loss=student["val_loss"], kd_loss=student["kd_loss"], status="done")
    elif failed is not None:
        out["status"] = f"failed: {failed['stage']} diverged at step {failed['step']} ({failed['component']} = " \
                        f"{failed['value']})"
    return out


def read_failure(round_dir: Path, index: int) -> Optional[dict]:
    path = candidate_dir(round_dir, index) / FAILED_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def run_candidate(cfg: SearchCommand, ctx: ParallelContext, cand: Candidate, round_dir: Path, start: str,
                  teacher: str, resident: Optional[ResidentModels] = None) -> None:
    """Prune `start` to the candidate and distil it from `teacher`, reusing what is complete.

    A distillation that diverges marks the candidate failed (failed.json) instead of ending
    the search: every rank sees the same reduced losses, so all ranks fail it together."""
    from minitron_megatron.train.driver import TrainingDiverged
    from minitron_megatron.train.teardown import release_stage

    if cand.skipped:
        return
    root = candidate_dir(round_dir, cand.index)
    pruned, student = root / "pruned", root / "student"
    if rd.is_complete(student) or (root / FAILED_JSON).is_file():
        return
    if ctx.is_main:
        rd.atomic_write_text(root / ARCH_JSON, json.dumps(cand.arch) + "\n")
    if not rd.is_complete(pruned):
        _prune(cfg, ctx, cand, round_dir, start, pruned, resident)
        release_stage()
    try:
        _distill(cfg, ctx, cand, teacher, pruned, student, resident)
    except TrainingDiverged as err:
        failure = {"stage": "distill", "step": err.step, "component": err.component, "value": str(err.value),
                   "message": str(err)}
        _announce(ctx, f"[candidate {cand.index}] failed: {err}")
        if ctx.is_main:
            rd.atomic_write_text(root / FAILED_JSON, json.dumps(failure, indent=2) + "\n")
        ctx.barrier()
    finally:
        release_stage()  # after the except block: its traceback held the failed run's frames


def _prune(cfg: SearchCommand, ctx: ParallelContext, cand: Candidate, round_dir: Path, start: str,
           pruned: Path, resident: Optional[ResidentModels]) -> None:
    from minitron_megatron.recipes.prune import prune

    if ctx.is_main and pruned.exists():  # an interrupted trim: nothing in it is committed
        shutil.rmtree(pruned)
    ctx.barrier()
    scores: Optional[str] = str(round_dir) if cfg.prune.method == "importance" else None
    p = replace(cfg.prune, stage="trim", scores=scores, target=to_target(cand.arch))
    _announce(ctx, f"[candidate {cand.index}] prune -> {pruned}")
    clock.restart()  # each run dir reports its own wall time
    prune(PruneCommand(**common(cfg, load=start, save=str(pruned)), prune=p, evaluate=cfg.evaluate), ctx,
          resident=resident)


def _distill(cfg: SearchCommand, ctx: ParallelContext, cand: Candidate, teacher: str, pruned: Path,
             student: Path, resident: Optional[ResidentModels]) -> None:
    from minitron_megatron.distill.loop import distill

    d = replace(cfg.distill, steps=cfg.search.steps)
    _announce(ctx, f"[candidate {cand.index}] distill {cfg.search.steps} steps -> {student}")
    clock.restart()
    distill(DistillCommand(**common(cfg, load=None, save=str(student)), teacher=replace(cfg.teacher, load=teacher),
                           student=ModelSource(load=str(pruned)), distill=d, evaluate=cfg.evaluate), ctx,
            resident=resident)


def _announce(ctx: ParallelContext, line: str) -> None:
    if ctx.is_main:
        print(line, flush=True)
