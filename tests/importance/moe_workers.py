"""Process bodies for the MoE importance tests (module level, so `spawn` can pickle them).

The reference (TP=1, EP=1, one process) saves a checkpoint, its own scores and the float64
reference of tests/importance/reference.py; the 2-process launch loads that checkpoint in
every layout in turn (re-initialising the runtime between them) and saves each rank's scores.
"""

from pathlib import Path

import torch

from tests.importance.workers import CALIB_SAMPLES, DEPTH_SAMPLES, MBS, PADDED_VOCAB, synthetic_dataset
from tests.model_utils import small_model

# Every (seq_agg, batch_agg) stage is covered once: expert-neuron scores depend on seq_agg,
# shared-expert scores on both.
AGGS = [("mean", "l2"), ("l2", "mean"), ("var", "var")]
# 8 experts (4 per EP rank), top-2, expert FFN 48, a shared expert of 32 (16 per TP rank), and
# two layers so that PP=2 puts one on each stage.
MOE = dict(num_layers=2, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=48,
           moe_shared_expert_intermediate_size=32)

# name: (tp, pp, ep, token dispatcher). World 2: DP is what is left (ep2 and pp2's DP=2 / 1:
# EP ranks are DP ranks for attention, so ep2 also splits the calibration data).
LAYOUTS = {
    "ep2": (1, 1, 2, "alltoall"),
    "tp2": (2, 1, 1, "allgather"),
    "tp2ep2": (2, 1, 2, "allgather"),
    "pp2": (1, 2, 1, "allgather"),
}


def build(ctx, dispatcher: str = "allgather"):
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model

    cfg = small_model(**MOE)
    parallel = ParallelConfig(tp=ctx.tp_size, pp=ctx.pp_size, ep=ctx.ep_size, moe_token_dispatcher_type=dispatcher)
    return cfg, build_gpt_model(cfg, ctx, parallel, PADDED_VOCAB)


def scores(model, cfg, ctx) -> dict:
    """{(seq_agg, batch_agg): {"scores", "meta"}}; the loss-based depth metrics with the first."""
    from minitron_megatron.config.prune import ImportanceConfig
    from minitron_megatron.importance import batches_fn, estimate_importance

    calib = batches_fn(synthetic_dataset(cfg, CALIB_SAMPLES, 0), CALIB_SAMPLES, MBS, ctx, "calib")
    valid = batches_fn(synthetic_dataset(cfg, DEPTH_SAMPLES, 1), DEPTH_SAMPLES, MBS, ctx, "valid")
    out = {}
    for k, (seq_agg, batch_agg) in enumerate(AGGS):
        metrics = ["block_importance", "loss_drop", "contiguous"] if k == 0 else ["block_importance"]
        icfg = ImportanceConfig(micro_batch_size=MBS, seq_agg=seq_agg, batch_agg=batch_agg, depth_metrics=metrics)
        result = estimate_importance(model, icfg, cfg, ctx, calib, valid)
        out[(seq_agg, batch_agg)] = {"scores": result.scores, "meta": result.meta}
    return out


def reference_worker(rank, world, out_dir):
    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.data import calibration_batches
    from minitron_megatron.runtime import init_runtime
    from tests.importance import reference

    out_dir = Path(out_dir)
    ctx = init_runtime(tp=1, pp=1, ep=1, device="cpu", seed=7)
    cfg, model = build(ctx)
    save_checkpoint(out_dir / "moe", 1, model, ctx)
    torch.save(scores(model, cfg, ctx), out_dir / "moe-ref.pt")
    calib = list(calibration_batches(synthetic_dataset(cfg, CALIB_SAMPLES, 0), CALIB_SAMPLES, MBS, 0, 1))
    dense = reference.capture(model, calib)
    moe = reference.capture_moe(model, calib)
    groups = cfg.resolved().num_query_groups
    expected = {agg: {**reference.reference_scores(dense, cfg.num_layers, cfg.num_attention_heads, groups, *agg),
                      **reference.reference_moe_scores(moe, cfg.num_layers, cfg.num_moe_experts, *agg)}
                for agg in AGGS}
    torch.save(expected, out_dir / "moe-f64.pt")


def parallel_worker(rank, world, out_dir, layouts):
    from minitron_megatron.checkpoint.dist import load_checkpoint
    from minitron_megatron.runtime import init_runtime

    for layout in layouts:
        tp, pp, ep, dispatcher = LAYOUTS[layout]
        ctx = init_runtime(tp=tp, pp=pp, ep=ep, device="cpu", seed=7)
        cfg, model = build(ctx, dispatcher)
        load_checkpoint(Path(out_dir) / "moe", model, ctx)
        torch.save(scores(model, cfg, ctx), Path(out_dir) / f"moe-{layout}-rank{rank}.pt")
