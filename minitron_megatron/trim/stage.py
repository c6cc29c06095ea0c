"""The trim stage of `prune`: validate -> load -> plan -> apply -> count -> zero-shot eval -> save.

Read top to bottom. Every check runs before the model is built, and nothing is written
before the pruned model exists, so a bad target exits with nothing on disk.
"""

import time
from dataclasses import replace
from typing import Dict, List, Optional

import torch

from minitron_megatron.checkpoint import dist as ckpt
from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.commands import CommonConfig
from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import EXPERT_METRICS, PruneConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.model import build_gpt_model, count_model_parameters, parameter_count
from minitron_megatron.runtime import clock
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.train import setup
from minitron_megatron.train.step import evaluate_loss
from minitron_megatron.trim.apply import apply_plan
from minitron_megatron.trim.hidden import BY_NORM_KEY, MOMENTS_KEY, combine_hidden, rescale_factors, rescale_mode, \
    validate_hidden
from minitron_megatron.trim.plan import DEPTH_METRICS, TrimPlan, check_scores, plan_from_scores
from minitron_megatron.trim.save import save_trimmed
from minitron_megatron.trim.scores import magnitude_scores, random_scores
from minitron_megatron.trim.validate import validate_target

METHODS = ("importance", "random", "magnitude")


def make_plan(prune: PruneConfig, model_cfg: ModelConfig, new_cfg: ModelConfig, *,
              scores: Optional[Dict[str, torch.Tensor]] = None, model=None,
              ctx: Optional[ParallelContext] = None, seed: int = 0) -> TrimPlan:
    """The plan of `prune.method`: importance scores, random scores (seeded) or weight magnitudes."""
    k = prune.importance.contiguous_k
    if prune.method == "importance":
        if scores is None:
            raise ConfigError("prune.method=importance needs importance scores (prune.scores=RUN_DIR)")
    elif prune.method == "random":
        scores = random_scores(model_cfg, seed, k)
    elif prune.method == "magnitude":
        scores = magnitude_scores(model, model_cfg, ctx, k)
    else:
        raise ConfigError(f"prune.method={prune.method!r} is not one of {list(METHODS)}")
    if prune.method == "importance":
        scores = hidden_variant(scores, prune)
    plan = plan_from_scores(model_cfg, new_cfg, scores, drop_layers=prune.target.drop_layers,
                            depth_metric=prune.depth_metric, residual_heads=prune.residual_heads,
                            method=prune.method, expert_metric=prune.expert_metric)
    if len(plan.hidden) < plan.source["hidden_size"]:
        plan.notes["norm_rescale"] = apply_norm_rescale(plan, rescale_mode(prune.norm_rescale), scores,
                                                        model_cfg.normalization)
    return plan


def apply_norm_rescale(plan: TrimPlan, mode: str, scores: Dict[str, torch.Tensor], normalization: str) -> str:
    """Set the plan's norm factors for prune.norm_rescale `mode`; returns what was done (for
    trim_plan.json). `auto` calibrates when the scores carry the moments: every importance run
    of this version does; random/magnitude scores and older score files do not."""
    has_moments = MOMENTS_KEY in scores
    if mode == "none" or (mode == "auto" and not has_moments):
        return "none" if mode == "none" else f"none (auto: the scores have no {MOMENTS_KEY!r})"
    if not has_moments:
        raise ConfigError(f"prune.norm_rescale=calibrated needs {MOMENTS_KEY!r} in the importance scores (a "
                          "prune.method=importance run of this version); use prune.norm_rescale=none or auto")
    plan.norm_scale, plan.norm_shift = rescale_factors(scores[MOMENTS_KEY], plan.hidden, normalization)
    return "calibrated"


def hidden_variant(scores: Dict[str, torch.Tensor], prune: PruneConfig) -> Dict[str, torch.Tensor]:
    """`scores` with hidden.channel recombined from the per-norm rows by prune.importance's
    hidden_norms / hidden_combine. Scores from before the per-norm rows existed keep the
    hidden.channel they were saved with (every norm, summed)."""
    if BY_NORM_KEY not in scores:
        return scores
    icfg = prune.importance
    return {**scores, "hidden.channel": combine_hidden(scores[BY_NORM_KEY], icfg.hidden_norms,
                                                       icfg.hidden_combine).float()}


def check_trim_settings(cfg: CommonConfig, prune: PruneConfig, ctx: ParallelContext,
                        pp_layout: Optional[List[int]] = None, eval_samples: Optional[int] = None,
                        eval_micro_batch_size: Optional[int] = None) -> ModelConfig:
    """Every trim setting (dirs, method, depth metric, target, evaluation) in one ConfigError,
    before any heavy work; returns the pruned architecture.

    Reads only `load`'s model.yaml (or, for a Megatron-LM save dir, `model` plus the padded
    vocab from the checkpoint metadata). `pp_layout` is the PRUNED model's stage layout
    (None: `cfg.parallel.pp_layout`); evaluation sizes default to `cfg.evaluate` when present.
    """
    layout = pp_layout if pp_layout is not None else cfg.parallel.pp_layout
    evaluate = getattr(cfg, "evaluate", None)
    if eval_samples is None:
        eval_samples = evaluate.samples if evaluate else 0
    if eval_micro_batch_size is None:
        eval_micro_batch_size = evaluate.micro_batch_size if evaluate else 1
    problems, new_cfg = _setting_problems(cfg, prune, ctx, eval_samples, eval_micro_batch_size), None
    if cfg.load:  # a missing load is already reported
        try:
            model_cfg, padded = source_model(cfg)
            new_cfg = validate_target(model_cfg, prune.target, ctx.tp_size, ctx.pp_size, layout, padded,
                                      ep=ctx.ep_size)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return new_cfg


def _setting_problems(cfg: CommonConfig, prune: PruneConfig, ctx: ParallelContext, samples: int, mbs: int):
    problems = []
    if not cfg.load:
        problems.append("load is required: the run directory to prune, e.g. load=runs/teacher")
    if not cfg.save:
        problems.append("save is required: the run directory to write, e.g. save=runs/pruned")
    elif rd.is_complete(cfg.save):
        problems.append(f"save={cfg.save} already holds a finished run (summary.json); choose a new directory")
    if prune.method not in METHODS:
        problems.append(f"prune.method={prune.method!r} is not one of {list(METHODS)}")
    problems += validate_hidden(prune.importance.hidden_norms, prune.importance.hidden_combine, prune.norm_rescale)
    if prune.depth_metric not in DEPTH_METRICS:
        problems.append(f"prune.depth_metric={prune.depth_metric!r} is not one of {list(DEPTH_METRICS)}")
    if prune.expert_metric not in EXPERT_METRICS:
        problems.append(f"prune.expert_metric={prune.expert_metric!r} is not one of {list(EXPERT_METRICS)}")
    if samples and samples < mbs * ctx.dp_size:
        problems.append(f"evaluate.samples={samples} must be 0 (no zero-shot evaluation) or at least "
                        f"evaluate.micro_batch_size x DP size = {mbs * ctx.dp_size}")
    return problems


def source_model(cfg: CommonConfig):
    """(model config, padded vocab) of `cfg.load`, without data or a model."""
    from minitron_megatron.checkpoint.megatron_lm import is_megatron_lm_dir
    from minitron_megatron.model.modules import padded_vocab_in_checkpoint

    rd.check_loadable(cfg.load)
    if is_megatron_lm_dir(cfg.load):
        return cfg.model, padded_vocab_in_checkpoint(cfg.load)
    model_cfg, padded, _ = rd.read_model_yaml(cfg.load)
    return rd.loaded_model_config(model_cfg, cfg.model, cfg.model_overrides, f"load={cfg.load}"), padded


def source_parallel(cfg: CommonConfig):
    """The model being pruned is always built with the even stage split: `parallel.pp_layout`
    describes the PRUNED model."""
    return replace(cfg.parallel, pp_layout=None)


def load_source(run, cfg: CommonConfig, ctx: ParallelContext, parallel=None):
    """This rank's shard of `cfg.load` (at `parallel`, default `source_parallel(cfg)`), built
    without initialisation and read once."""
    parallel = parallel or source_parallel(cfg)
    model = build_gpt_model(run.model_cfg, ctx, parallel, run.padded_vocab, init="none")
    ckpt.load_checkpoint(rd.checkpoint_root(cfg.load), model, ctx)
    return model


def trim_stage(cfg: CommonConfig, prune: PruneConfig, ctx: ParallelContext, *,
               scores: Optional[Dict[str, torch.Tensor]] = None, pp_layout: Optional[List[int]] = None,
               eval_samples: int = 64, eval_micro_batch_size: int = 4) -> dict:
    """Prune `cfg.load` into `cfg.save` at this TP/PP; returns the summary (also summary.json).

    The stand-alone trim: checks, data, one load, then `trim_model`. `pp_layout`: layers
    per stage of the PRUNED model (None: `cfg.parallel.pp_layout`, whose None is an even
    split). `eval_samples=0` skips the zero-shot evaluation.
    """
    pp_layout = pp_layout if pp_layout is not None else cfg.parallel.pp_layout
    new_cfg = check_trim_settings(cfg, prune, ctx, pp_layout, eval_samples, eval_micro_batch_size)
    run = setup.prepare_run(replace(cfg, parallel=source_parallel(cfg)), ctx, num_train_samples=1,
                            num_valid_samples=max(eval_samples, 1))
    if prune.method == "importance" and scores is not None:
        check_scores(run.model_cfg, scores, sorted(scores))  # wrong shapes fail before loading
    model = load_source(run, cfg, ctx)
    return trim_model(model, run, cfg, prune, ctx, new_cfg, scores=scores, pp_layout=pp_layout,
                      eval_samples=eval_samples, eval_micro_batch_size=eval_micro_batch_size)


def trim_model(model, run, cfg: CommonConfig, prune: PruneConfig, ctx: ParallelContext, new_cfg: ModelConfig, *,
               scores: Optional[Dict[str, torch.Tensor]], pp_layout: Optional[List[int]], eval_samples: int,
               eval_micro_batch_size: int, extra_summary: Optional[dict] = None,
               release_source: bool = True) -> dict:
    """Plan -> apply -> count -> zero-shot eval -> save, on the loaded source `model` (consumed,
    unless `release_source=False`: a borrowed model, left as it was, checkpoint/resident.py).

    `new_cfg` is `check_trim_settings`' result (validated once, before any heavy work).
    """
    new_cfg = replace(new_cfg, vocab_size=run.model_cfg.vocab_size)  # a Megatron-LM source takes it from data
    params_before = count_model_parameters(model, ctx)
    plan = make_plan(prune, run.model_cfg, new_cfg, scores=scores, model=model, ctx=ctx, seed=cfg.seed)
    trim_start = time.time()
    result = apply_plan(model, plan, run.model_cfg, ctx, source_parallel(cfg), run.padded_vocab, pp_layout,
                        release_source=release_source)
    trim_seconds = time.time() - trim_start
    del model
    params_after = count_model_parameters(result.model, ctx)
    expected = parameter_count(result.model_cfg, run.padded_vocab)
    if params_after != expected:
        raise RuntimeError(f"pruned model has {params_after} parameters, its config {expected}")
    summary = {"params_before": params_before, "params_after": params_after, "val_loss": None, "ppl": None,
               "method": plan.method, "trim_seconds": round(trim_seconds, 2)}
    if eval_samples:
        eval_start = time.time()
        batches = run.valid_batches(eval_micro_batch_size, ctx, eval_samples)
        val = evaluate_loss([result.model], batches, ctx, len(batches), eval_micro_batch_size, run.seq_length)
        summary.update(val_loss=val["val_loss"], ppl=val["ppl"], eval_seconds=round(time.time() - eval_start, 2))
    summary.update(extra_summary or {})
    summary["seconds"] = clock.elapsed()
    save_trimmed(cfg.save, result, plan, run.padded_vocab, run.tokenizer_path, ctx, summary, origin=cfg.load,
                 seq_length=run.seq_length)
    return summary
