"""Process bodies for the importance tests (module level, so `spawn` can pickle them).

Every worker calls `init_runtime` itself (several layouts may run in one launch:
re-initialising Megatron's parallel state is cheaper than spawning again) and
writes its results with torch.save into the directory the test passed in.
"""

import itertools
from pathlib import Path

import torch

from tests.model_utils import small_model

AGGS = list(itertools.product(("mean", "l2", "var"), ("mean", "l2", "var")))  # (seq_agg, batch_agg)
CALIB_SAMPLES, DEPTH_SAMPLES, MBS = 8, 4, 2
PADDED_VOCAB = 256

CASES = {
    # GQA, SwiGLU, RMSNorm; 3 layers split [2, 1] at PP=2.
    "gqa": dict(num_layers=3, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96),
    # 6 heads in 2 groups (3 per TP rank), ffn 160 (80 per rank), LayerNorm + biases, plain GELU
    # MLP, heads*kv_channels != hidden; 3 layers split [1, 2] at PP=2.
    "odd": dict(num_layers=3, num_attention_heads=6, num_query_groups=2, ffn_hidden_size=160,
                normalization="LayerNorm", add_bias_linear=True, gated_linear_unit=False, activation="gelu"),
}
PP_LAYOUT = {"gqa": None, "odd": [1, 2]}


def synthetic_dataset(cfg, num_samples: int, seed: int):
    """A list of GPTDataset-like samples: random tokens (enough to exercise every unit)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (num_samples, cfg.max_position_embeddings + 1), generator=gen)
    return [{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(cfg.max_position_embeddings),
             "position_ids": torch.arange(cfg.max_position_embeddings)} for t in tokens]


def build(case: str, ctx, sequence_parallel: bool = False, pp_layout=None):
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model

    cfg = small_model(**CASES[case])
    parallel = ParallelConfig(tp=ctx.tp_size, pp=ctx.pp_size, sequence_parallel=sequence_parallel,
                              pp_layout=pp_layout if ctx.pp_size > 1 else None)
    return cfg, build_gpt_model(cfg, ctx, parallel, PADDED_VOCAB)


def all_scores(model, cfg, ctx) -> dict:
    """{(seq_agg, batch_agg): ImportanceResult} for every aggregation; depth metrics once."""
    from minitron_megatron.config.prune import ImportanceConfig
    from minitron_megatron.importance import batches_fn, estimate_importance

    calib = batches_fn(synthetic_dataset(cfg, CALIB_SAMPLES, 0), CALIB_SAMPLES, MBS, ctx, "calib")
    valid = batches_fn(synthetic_dataset(cfg, DEPTH_SAMPLES, 1), DEPTH_SAMPLES, MBS, ctx, "valid")
    out = {}
    for seq_agg, batch_agg in AGGS:
        metrics = ["block_importance", "loss_drop", "contiguous"] if (seq_agg, batch_agg) == ("mean", "l2") \
            else ["block_importance"]
        icfg = ImportanceConfig(micro_batch_size=MBS, seq_agg=seq_agg, batch_agg=batch_agg, depth_metrics=metrics)
        result = estimate_importance(model, icfg, cfg, ctx, calib, valid)
        out[(seq_agg, batch_agg)] = {"scores": result.scores, "meta": result.meta}
    return out


def fuse_norms_like_te(model) -> None:
    """Rewrite a local-spec model into Transformer Engine's layout, same function:
    input_layernorm / pre_mlp_layernorm become IdentityOp and linear_qkv / linear_fc1
    normalise their own input with a `layer_norm_weight` (and `layer_norm_bias`)."""
    from megatron.core.transformer.identity_op import IdentityOp

    for layer in model.decoder.layers:
        for norm_name, linear in (("input_layernorm", layer.self_attention.linear_qkv),
                                  ("pre_mlp_layernorm", layer.mlp.linear_fc1)):
            norm = getattr(layer, norm_name)
            linear.layer_norm_weight = norm.weight
            if getattr(norm, "bias", None) is not None:
                linear.layer_norm_bias = norm.bias
            linear.forward = (lambda fwd, n: lambda x, *a, **k: fwd(n(x), *a, **k))(linear.forward, norm)
            setattr(layer, norm_name, IdentityOp())


def reference_worker(rank, world, out_dir):
    """TP=1/PP=1/DP=1: for every case, scores for every aggregation, a checkpoint for the
    parallel runs, the float64 reference, and the same model rewritten in TE's fused layout."""
    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.data import calibration_batches
    from minitron_megatron.runtime import init_runtime
    from tests.importance import reference

    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=7)
    for case in CASES:
        cfg, model = build(case, ctx)
        save_checkpoint(Path(out_dir) / case, 1, model, ctx)
        torch.save(all_scores(model, cfg, ctx), Path(out_dir) / f"{case}-ref.pt")
        calib = list(calibration_batches(synthetic_dataset(cfg, CALIB_SAMPLES, 0), CALIB_SAMPLES, MBS, 0, 1))
        valid = list(calibration_batches(synthetic_dataset(cfg, DEPTH_SAMPLES, 1), DEPTH_SAMPLES, MBS, 0, 1))
        acts = reference.capture(model, calib)
        groups = cfg.resolved().num_query_groups
        expected = {agg: reference.reference_scores(acts, cfg.num_layers, cfg.num_attention_heads, groups, *agg,
                                                    normalization=cfg.normalization, eps=cfg.layernorm_epsilon)
                    for agg in AGGS}
        L, k = cfg.num_layers, 2
        losses = {"baseline": reference.loss_without(model, valid, []),
                  "layer": [reference.loss_without(model, valid, [i]) for i in range(L)],
                  "block": [reference.loss_without(model, valid, range(i, i + k)) for i in range(L - k + 1)]}
        torch.save({"scores": expected, "losses": losses}, Path(out_dir) / f"{case}-f64.pt")
        fuse_norms_like_te(model)
        torch.save(all_scores(model, cfg, ctx), Path(out_dir) / f"{case}-fused.pt")
    torch.save(bad_inputs(ctx), Path(out_dir) / "errors.pt")
    stage_on_run_dir(ctx, Path(out_dir))


def stage_on_run_dir(ctx, out_dir: Path) -> None:
    """The importance stage end to end: a run dir (model.yaml + checkpoint) and a tiny stdlib
    corpus (512-token vocab) -> importance.* and plots in `save`."""
    import os

    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.checkpoint.run_dir import checkpoint_root, write_model_yaml
    from minitron_megatron.config.commands import CommonConfig
    from minitron_megatron.config.data import DataConfig
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.prune import ImportanceConfig
    from minitron_megatron.data import prepare_data
    from minitron_megatron.importance import run_importance_stage
    from minitron_megatron.model import build_gpt_model

    data = DataConfig(cache_dir=os.environ.get("MINITRON_CACHE") or str(out_dir / "cache"),
                      stdlib_vocab_size=512, stdlib_max_mb=0.3)
    cfg = small_model(**CASES["gqa"], vocab_size=512)
    run_dir = out_dir / "run"
    write_model_yaml(run_dir, cfg, 512, prepare_data(data).tokenizer_model)
    save_checkpoint(checkpoint_root(run_dir), 1, build_gpt_model(cfg, ctx, ParallelConfig(), 512), ctx)
    common = CommonConfig(data=data, load=str(run_dir), save=str(out_dir / "scored"), device="cpu")
    icfg = ImportanceConfig(calibration_samples=8, micro_batch_size=MBS, depth_samples=4)
    result = run_importance_stage(common, icfg, ctx)
    torch.save({"scores": result.scores, "meta": result.meta}, out_dir / "stage.pt")


def bad_inputs(ctx) -> dict:
    """{name: (ConfigError message or None, forward calls made before the error)}."""
    from megatron.core.transformer.identity_op import IdentityOp

    from minitron_megatron.config.prune import ImportanceConfig
    from minitron_megatron.errors import ConfigError
    from minitron_megatron.importance import batches_fn, estimate_importance

    cfg, _ = build("gqa", ctx)
    good = batches_fn(synthetic_dataset(cfg, 4, 0), 4, MBS, ctx, "calib")
    long = synthetic_dataset(small_model(**CASES["gqa"], max_position_embeddings=64), 4, 0)

    def attempt(model, icfg=ImportanceConfig(micro_batch_size=MBS), calib=good, valid=good):
        calls = []
        model.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            estimate_importance(model, icfg, cfg, ctx, calib, valid)
        except ConfigError as err:
            return str(err), len(calls)
        return None, len(calls)

    def moe_like():
        model = build("gqa", ctx)[1]
        model.decoder.layers[1].mlp = IdentityOp()
        return model

    def bypassed_fc2():  # like a fused MLP implementation that never calls linear_fc2
        model = build("gqa", ctx)[1]
        model.decoder.layers[1].mlp.forward = lambda hidden_states, **kwargs: (hidden_states, None)
        return model

    fresh = lambda: build("gqa", ctx)[1]  # noqa: E731
    return {
        "layout_no_fc2": attempt(moe_like()),
        "layout_not_gpt": attempt(torch.nn.Sequential(torch.nn.Linear(4, 4))),
        "bypassed_fc2": attempt(bypassed_fc2()),
        "unknown_agg": attempt(fresh(), ImportanceConfig(micro_batch_size=MBS, seq_agg="max")),
        "empty_calibration": attempt(fresh(), calib=lambda: []),
        "no_validation_data": attempt(fresh(), valid=None),
        "long_samples": attempt(fresh(), calib=lambda: [{"tokens": torch.stack([s["tokens"] for s in long])}]),
    }


LAYOUTS = {
    # name: (tp, pp, sequence_parallel)
    "tp2": (2, 1, False),
    "pp2": (1, 2, False),
    "dp2": (1, 1, False),
    "tp2pp2": (2, 2, False),  # world 4
    "tp2dp2": (2, 1, False),  # world 4
}


def parallel_worker(rank, world, out_dir, layouts):
    """Each layout in turn on the same processes: load the TP=1 checkpoint, score, save per rank."""
    from minitron_megatron.checkpoint.dist import load_checkpoint
    from minitron_megatron.runtime import init_runtime

    for layout in layouts:
        if layout == "sp_synthetic":
            sequence_parallel_check(rank, out_dir)
            continue
        tp, pp, sp = LAYOUTS[layout]
        ctx = init_runtime(tp=tp, pp=pp, device="cpu", seed=7)
        for case in CASES:
            cfg, model = build(case, ctx, sequence_parallel=sp, pp_layout=PP_LAYOUT[case])
            load_checkpoint(Path(out_dir) / case, model, ctx)
            torch.save(all_scores(model, cfg, ctx), Path(out_dir) / f"{case}-{layout}-rank{rank}.pt")


class _ShardedLayer(torch.nn.Module):
    """Stands in for a TransformerLayer under sequence parallelism (Megatron's local norms
    refuse SP on CPU): the norm and the layer's input/output see [s/tp, b, h] sequence shards,
    linear_proj / linear_fc2 inputs the full sequence with this rank's heads / neurons."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj, self.fc2 = torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()

    def forward(self, hidden_states, attn, mlp, out):
        self.norm(hidden_states)
        self.proj(attn)
        self.fc2(mlp)
        return out, None


def sequence_parallel_check(rank, out_dir, microbatches=3, s=8, b=2, h=6, heads=4, d=3, ffn=10):
    """Collector + reduction at TP=2 with SP on synthetic shards vs the float64 reference."""
    from minitron_megatron.importance.collector import ImportanceCollector
    from minitron_megatron.importance.reduce import reduce_statistics
    from minitron_megatron.model.probes import InputProbe, LayerProbe, ModelProbes, NormProbe
    from minitron_megatron.runtime import init_runtime
    from tests.importance import reference

    ctx = init_runtime(tp=2, pp=1, device="cpu", seed=7)
    gen = torch.Generator().manual_seed(3)
    full = [{"hs": torch.randn(s, b, h, generator=gen), "out": torch.randn(s, b, h, generator=gen),
             "attn": torch.randn(s, b, heads * d, generator=gen), "mlp": torch.randn(s, b, ffn, generator=gen)}
            for _ in range(microbatches)]
    layer = _ShardedLayer()
    probes = ModelProbes([LayerProbe(layer, 0, InputProbe(layer.proj), InputProbe(layer.fc2),
                                     [NormProbe("layer0.input_norm", layer.norm)])], None, num_layers=1, hidden_size=h,
                         num_attention_heads=heads, num_query_groups=2, kv_channels=d, ffn_hidden_size=ffn,
                         tp_size=2, sequence_parallel=True)
    tokens, units = slice(rank * s // 2, (rank + 1) * s // 2), lambda n: slice(rank * n // 2, (rank + 1) * n // 2)
    results = {}
    for seq_agg, batch_agg in AGGS:
        with ImportanceCollector(probes, seq_agg, ctx) as col:
            for mb in full:
                layer(hidden_states=mb["hs"][tokens], attn=mb["attn"][..., units(heads * d)],
                      mlp=mb["mlp"][..., units(ffn)], out=mb["out"][tokens])
                col.end_microbatch()
        results[(seq_agg, batch_agg)] = reduce_statistics(col, batch_agg, ctx)
    cat = {k: torch.cat([mb[k] for mb in full], dim=1).double() for k in full[0]}
    acts = {"proj0": cat["attn"], "fc2_0": cat["mlp"], "norm_in0": cat["hs"], "normx_in0": cat["hs"],
            "norm_mlp0": torch.zeros_like(cat["hs"]),
            "layer_in0": cat["hs"], "layer_out0": cat["out"], "norm_final": torch.zeros_like(cat["hs"])}
    expected = {agg: reference.reference_scores(acts, 1, heads, 2, *agg) for agg in AGGS}
    torch.save({"got": results, "expected": expected}, Path(out_dir) / f"sp-rank{rank}.pt")
