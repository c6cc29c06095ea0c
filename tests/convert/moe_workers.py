"""The multi-rank body of tests/convert/test_moe.py (module level: spawned processes unpickle it)."""

import json
from pathlib import Path

import torch

from tests.convert.workers import _save_if_writer, run_dir_logits

MOE_LAYOUTS = {"tp1": (1, 1), "ep2": (1, 2), "tp2": (2, 1)}
"""Import layouts (tp, ep); 2 processes each (TP=1 runs as DP=2, EP=2 as 2 experts per rank)."""
MOE_EXPORT_AT = {"tp1": "ep2", "ep2": "tp2"}
"""Run dir imported at key -> the layout it is exported at: each EP rank writing its own experts,
and a run dir saved at EP=2 read back whole by both TP ranks."""
PRUNE = dict(num_moe_experts=2, moe_ffn_hidden_size=16)
"""4 -> 2 experts of width 32 -> 16 (and Qwen2-MoE's shared expert 48 -> 32): one expert per EP rank."""
SHARED_PRUNED = 32


def trim_moe(src: Path, dst: Path, ctx) -> None:
    """Prune an imported MoE run dir at the context's TP/EP with the real trimmer and the
    magnitude baseline (prune.method=magnitude): fewer and narrower experts, a narrower shared
    expert, saved with the import's config.json carried over (as `prune` does)."""
    from minitron_megatron.checkpoint import run_dir as rd
    from minitron_megatron.checkpoint.dist import load_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.prune import TrimTarget
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.trim import apply_plan, magnitude_scores, plan_from_scores, save_trimmed, validate_target

    cfg, padded, tokenizer = rd.read_model_yaml(src)
    parallel = ParallelConfig(tp=ctx.tp_size, ep=ctx.ep_size)
    model = build_gpt_model(cfg, ctx, parallel, padded, init="none")
    load_checkpoint(rd.checkpoint_root(src), model, None)
    shared = SHARED_PRUNED if cfg.moe_shared_expert_intermediate_size else None
    target = TrimTarget(**PRUNE, moe_shared_expert_intermediate_size=shared)
    new_cfg = validate_target(cfg, target, ctx.tp_size, ctx.pp_size, padded_vocab=padded, ep=ctx.ep_size)
    plan = plan_from_scores(cfg, new_cfg, magnitude_scores(model, cfg, ctx), method="magnitude",
                            expert_metric="output_norm")
    result = apply_plan(model, plan, cfg, ctx, parallel, padded)
    save_trimmed(dst, result, plan, padded, tokenizer, ctx, summary={"trimmed": True}, origin=str(src))


def convert_moe(rank, world, root, families):
    """Import every MoE family at TP=1, EP=2 and TP=2 and take each run dir's logits; export run
    dirs at another layout than their import's; prune each EP=2 import (4 -> 2 experts) at EP=2,
    take its logits and export it at EP=2."""
    from minitron_megatron.config.commands import ConvertCommand
    from minitron_megatron.config.convert import ConvertConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.convert import convert
    from minitron_megatron.runtime import init_runtime

    root = Path(root)
    tokens = torch.load(root / "hf" / "tokens.pt")
    summaries = {}
    for layout, (tp, ep) in MOE_LAYOUTS.items():
        ctx = init_runtime(tp=tp, ep=ep, device="cpu", seed=3)
        parallel = ParallelConfig(tp=tp, ep=ep)
        for family in families:
            run = root / f"{family}-{layout}"
            summaries[f"import {family} {layout}"] = convert(
                ConvertCommand(from_hf=str(root / "hf" / family), save=str(run), parallel=parallel), ctx)
            _save_if_writer(ctx, run_dir_logits(run, ctx, tokens), root / f"logits-{family}-{layout}.pt")
        for source in (s for s, target in MOE_EXPORT_AT.items() if target == layout):
            for family in families:
                summaries[f"export {family} {source}@{layout}"] = convert(
                    ConvertCommand(load=str(root / f"{family}-{source}"), to_hf=str(root / f"out-{family}-{source}"),
                                   parallel=parallel, convert=ConvertConfig(max_shard_size_mb=1)), ctx)
        if layout == "ep2":
            for family in families:
                pruned = root / f"pruned-{family}"
                trim_moe(root / f"{family}-ep2", pruned, ctx)
                _save_if_writer(ctx, run_dir_logits(pruned, ctx, tokens), root / f"logits-pruned-{family}.pt")
                summaries[f"export pruned {family}"] = convert(
                    ConvertCommand(load=str(pruned), to_hf=str(root / f"out-pruned-{family}"), parallel=parallel), ctx)
    if rank == 0:
        (root / "summaries.json").write_text(json.dumps(summaries, indent=1))
