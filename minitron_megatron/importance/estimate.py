"""`estimate_importance`: calibration pass + reduction + depth metrics -> global score tensors.

    probes -> hooks accumulate locally during one forward-only pass -> one reduction
    -> loss-based depth passes -> scores (float32, global order, larger = more important)

Token positions all count, whatever the loss mask: calibration samples are full
GPTDataset sequences (no padding), and a position masked out of the loss (e.g. after
an end-of-document token with eod_mask_loss) still flows through every unit.
"""

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import DEPTH_METRICS, ImportanceConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.importance.aggregation import AGGREGATIONS
from minitron_megatron.importance.calibration import calibration_pass
from minitron_megatron.importance.collector import ImportanceCollector
from minitron_megatron.importance.depth import loss_depth_scores, perplexity
from minitron_megatron.importance.reduce import broadcast_scores, group_scores, reduce_statistics
from minitron_megatron.model.probes import find_probes
from minitron_megatron.runtime.context import ParallelContext
from minitron_megatron.trim.hidden import BY_NORM_KEY, combine_hidden, norm_names, validate_hidden

LOSS_METRICS = ("loss_drop", "contiguous")
FORMAT_VERSION = 1


@dataclass
class ImportanceResult:
    """Score tensors by contract name (see config/prune.py) and the importance.json metadata."""

    scores: Dict[str, torch.Tensor]
    meta: dict


def validate_importance(cfg: ImportanceConfig, num_layers: int) -> None:
    """Every problem with the importance settings, in one ConfigError (no data or model needed)."""
    problems = []
    for name in ("batch_agg", "seq_agg"):
        if getattr(cfg, name) not in AGGREGATIONS:
            problems.append(f"prune.importance.{name}={getattr(cfg, name)!r} is not one of {list(AGGREGATIONS)}")
    unknown = [m for m in cfg.depth_metrics if m not in DEPTH_METRICS]
    if unknown:
        problems.append(f"prune.importance.depth_metrics has {unknown}; allowed: {list(DEPTH_METRICS)}")
    problems += validate_hidden(cfg.hidden_norms, cfg.hidden_combine, "none")
    if cfg.micro_batch_size < 1:
        problems.append(f"prune.importance.micro_batch_size={cfg.micro_batch_size} must be >= 1")
    if "contiguous" in cfg.depth_metrics and not 1 <= cfg.contiguous_k <= num_layers:
        problems.append(f"prune.importance.contiguous_k={cfg.contiguous_k} must be in [1, model.num_layers="
                        f"{num_layers}]")
    if problems:
        raise ConfigError(problems)


def needs_validation_data(cfg: ImportanceConfig) -> bool:
    return any(m in LOSS_METRICS for m in cfg.depth_metrics)


def check_sample_count(num_samples: int, available: int, mbs: int, ctx: ParallelContext, setting: str) -> int:
    """Samples actually used (a multiple of mbs x DP); ConfigError when impossible."""
    per_step = mbs * ctx.dp_size
    if available < per_step:
        raise ConfigError(f"{setting}: the dataset has {available} samples, fewer than micro_batch_size x DP size "
                          f"= {per_step}; use more data or a smaller prune.importance.micro_batch_size")
    if not per_step <= num_samples <= available:
        raise ConfigError(f"{setting}={num_samples} must be between micro_batch_size x DP size = {per_step} "
                          f"and the {available} samples the dataset has")
    return num_samples - num_samples % per_step


def batches_fn(dataset, num_samples: int, mbs: int, ctx: ParallelContext, setting: str) -> Callable[[], List[dict]]:
    """A checked `() -> this DP rank's microbatches` over the first `num_samples` samples of `dataset`.

    Checks happen now (before any pass); batches are built when called.
    """
    used = check_sample_count(num_samples, len(dataset), mbs, ctx, setting)

    def batches() -> List[dict]:
        from minitron_megatron.data import calibration_batches  # imports Megatron's datasets: only when used

        return list(calibration_batches(dataset, used, mbs, ctx.dp_rank, ctx.dp_size))

    return batches


def _load_batches(fn: Optional[Callable], what: str, limit: int) -> List[dict]:
    """The batches; their length is the run's sequence length, at most the model's position limit."""
    batches = list(fn()) if fn is not None else []
    if not batches:
        raise ConfigError(f"importance: no {what} batches on this rank; give at least micro_batch_size x DP "
                          "size samples")
    if _seq_length(batches) > limit:
        raise ConfigError(f"importance: {what} samples have {_seq_length(batches)} tokens, more than the model's "
                          f"max_position_embeddings={limit}")
    return batches


def _seq_length(batches: List[dict]) -> int:
    return batches[0]["tokens"].shape[-1]


def _width_scores(model_chunks, probes, cfg: ImportanceConfig, ctx, batches, seq_length) -> Dict[str, torch.Tensor]:
    block = "block_importance" in cfg.depth_metrics
    with ImportanceCollector(probes, cfg.seq_agg, ctx, block_importance=block) as collector:
        calibration_pass(model_chunks, batches, ctx, cfg.micro_batch_size, seq_length, collector.end_microbatch)
    collector.check_every_site_ran(len(batches))
    scores = reduce_statistics(collector, cfg.batch_agg, ctx)
    scores["attn.group"] = group_scores(scores["attn.head"], probes.num_query_groups)
    # The default combination; the trimmer recombines the per-norm rows if asked to.
    scores["hidden.channel"] = combine_hidden(scores[BY_NORM_KEY], cfg.hidden_norms, cfg.hidden_combine)
    return scores


def estimate_importance(model, cfg: ImportanceConfig, model_cfg: ModelConfig, ctx: ParallelContext,
                        calib_batches_fn: Callable[[], List[dict]],
                        valid_batches_fn: Optional[Callable[[], List[dict]]] = None) -> ImportanceResult:
    """Importance of every head, query group, neuron, hidden channel and layer of `model`.

    `model`: this rank's GPTModel (or [chunk]); the batch functions return this DP rank's
    microbatches (see `batches_fn`). Every check runs before the first pass. The result is
    identical on every rank; scores are float32 in global (TP=1/PP=1) order.
    """
    model_cfg = model_cfg.resolved()
    validate_importance(cfg, model_cfg.num_layers)
    model_chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(model_chunks) != 1:
        raise ConfigError(f"importance: {len(model_chunks)} model chunks (virtual pipeline stages) are not "
                          "supported; build the model without virtual pipeline parallelism")
    probes = find_probes(model_chunks)
    limit = model_cfg.max_position_embeddings
    calib = _load_batches(calib_batches_fn, "calibration", limit)
    valid = _load_batches(valid_batches_fn, "validation", limit) if needs_validation_data(cfg) else []

    scores = _width_scores(model_chunks, probes, cfg, ctx, calib, _seq_length(calib))
    samples = int(scores.pop("samples").item())
    depth = {}
    if valid:
        depth = loss_depth_scores(model_chunks, probes, valid, ctx, cfg.micro_batch_size, _seq_length(valid),
                                  cfg.depth_metrics, cfg.contiguous_k)
        scores.update({k: v.to(ctx.device) for k, v in depth.items() if k.startswith("depth.")})
    broadcast_scores(scores, ctx)
    scores = {k: v.to(torch.float32).cpu().contiguous() for k, v in scores.items()}
    meta = importance_meta(scores, cfg, model_cfg, ctx, samples, _seq_length(calib),
                           len(valid) * cfg.micro_batch_size * ctx.dp_size, depth)
    return ImportanceResult(scores, meta)


MOE_META = {
    "expert": "per expert: mean over the tokens routed to it of the L2 norm of its (routing-prob-scaled) output",
    "expert_frequency": "per expert: fraction of calibration tokens routed to it (sums to moe_router_topk)",
    "expert_neuron": "per expert, per FFN neuron: seq_agg over the tokens routed to the expert (no batch "
                     "stage: routed tokens form no per-sample sequences) of its prob-scaled linear_fc2 input",
    "neuron": "per FFN neuron: the same over every routed (token, expert) pair",
    "shared_neuron": "per shared-expert neuron: seq_agg then batch_agg, as mlp.neuron",
}


def _ascending(values: torch.Tensor) -> List[int]:
    """Indices from least to most important (stable, so ties keep index order)."""
    return [int(i) for i in torch.sort(values, stable=True).indices]


def importance_meta(scores: Dict[str, torch.Tensor], cfg: ImportanceConfig, model_cfg: ModelConfig,
                    ctx: ParallelContext, samples: int, seq_length: int, depth_samples: int, depth: dict) -> dict:
    """The importance.json body: what was measured, how, and the layer rankings."""
    meta = {
        "format": FORMAT_VERSION,
        "model": asdict(model_cfg),
        "aggregation": {"seq": cfg.seq_agg, "batch": cfg.batch_agg},
        "calibration": {"samples": samples, "seq_length": seq_length, "tokens": samples * seq_length,
                        "micro_batch_size": cfg.micro_batch_size, "loss_mask": "ignored: every position counts"},
        "parallel": {"tp": ctx.tp_size, "pp": ctx.pp_size, "ep": ctx.ep_size, "dp": ctx.dp_size},
        "group_score": "sum of the group's query-head scores",
        "hidden": {"norms": norm_names(model_cfg.num_layers), "hidden_norms": cfg.hidden_norms,
                   "hidden_combine": cfg.hidden_combine,
                   "channel_by_norm": "per-norm channel scores, rows in `norms` order",
                   "norm_moments": "per norm, per channel: mean over tokens of z and z^2, z = the "
                                   "normalised norm input (before gamma)"},
        "scores": {name: list(t.shape) for name, t in sorted(scores.items())},
        "layer_rankings": {name: _ascending(t) for name, t in sorted(scores.items()) if name.startswith("depth.")},
        "ranking_order": "least important first",
    }
    if model_cfg.is_moe:
        meta["moe"] = MOE_META
    if depth:
        meta["depth"] = {
            "samples": depth_samples,
            "baseline_val_loss": depth["baseline"],
            "baseline_ppl": perplexity(depth["baseline"]),
            "contiguous_k": cfg.contiguous_k,
        }
        for key in ("layer_loss", "block_loss"):
            if key in depth:
                meta["depth"][f"{key}_skipped"] = list(depth[key])
                meta["depth"][f"{key.split('_')[0]}_ppl_skipped"] = [perplexity(v) for v in depth[key]]
    return meta
