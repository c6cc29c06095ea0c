"""Sharded trimming under real gloo processes: TP=2, PP=2 and TP=2 x PP=2 against TP=1.

One launch per layout runs every case (a launch costs ~10 s). The TP=1 run is itself
checked against `reference.reference_trim`, an independent slicer of the full weights.
"""

import math
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.model_utils import gather_tp
from tests.trim.cases import CASES, GQA, PADDED, PP_CASES, batches, synthetic_scores
from tests.trim.reference import reference_trim

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.compat


# ---- workers (spawned processes) ---------------------------------------------------------------

def _gathered(model, ctx, global_names: bool = False):
    """Full (TP=1 layout) weights of this stage, optionally keyed by global layer index."""
    from minitron_megatron.model.layout import split_layer_name

    out = {}
    for name, p in model.named_parameters():
        key = name
        if global_names and split_layer_name(name):
            local, suffix = split_layer_name(name)
            key = f"decoder.layers.{model.decoder.layers[local].layer_number - 1}.{suffix}"
        out[key] = gather_tp(p.data, p, ctx.tp_group, ctx.tp_size)
    return out


def _logits(model, cfg, ctx):
    import torch.distributed as dist

    batch = batches(cfg, num=1)[0]
    with torch.no_grad():
        local = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V/tp]
    if ctx.tp_size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)


def _plan(case, ctx, tp, pp):
    from minitron_megatron.trim import plan_from_scores, validate_target

    new_cfg = validate_target(case.model, case.target, tp, pp, case.pp_layout if pp > 1 else None, PADDED)
    plan = plan_from_scores(case.model, new_cfg, synthetic_scores(case.model, seed=5),
                            drop_layers=case.target.drop_layers, depth_metric=case.depth_metric,
                            residual_heads=case.residual_heads)
    if len(plan.hidden) < case.model.hidden_size:
        # A distinct norm rescale factor per norm row: one landing on the wrong norm (another
        # layer after depth pruning, another stage, the final norm) differs from the reference.
        plan.norm_scale = [1 + 0.05 * (row + 1) for row in range(2 * case.model.num_layers + 1)]
    return plan


def _sgd_step_loss(model, cfg):
    """Loss after one plain SGD step: backward must work and give every parameter a gradient."""
    batch = batches(cfg, num=1)[0]
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
    loss.backward()
    with torch.no_grad():
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.shape == p.shape, name
            p -= 0.5 * p.grad
        return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()


def _tp_case(name, case, ctx):
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model, count_model_parameters, parameter_count
    from minitron_megatron.trim import apply_plan, keep_plan, magnitude_scores

    torch.manual_seed(11)  # CPU init draws full weights: identical at every TP for one seed
    parallel = ParallelConfig(tp=ctx.tp_size)
    model = build_gpt_model(case.model, ctx, parallel, PADDED)
    out = {"original": _gathered(model, ctx), "logits_before": _logits(model, case.model, ctx)}
    if name == "keep":
        out["magnitude"] = magnitude_scores(model, case.model, ctx)
    plan = keep_plan(case.model) if name == "keep" else _plan(case, ctx, ctx.tp_size, 1)
    result = apply_plan(model, plan, case.model, ctx, parallel, PADDED)
    out.update(plan=plan.to_json(), weights=_gathered(result.model, ctx), logits=_logits(result.model, case.model, ctx),
               params=count_model_parameters(result.model, ctx), expected=parameter_count(result.model_cfg, PADDED),
               loss_after_step=_sgd_step_loss(result.model, case.model))
    return out


def _pp_case(case, ctx, ckpt_root):
    """Load the TP1/PP1 weights, trim, then eval and one Megatron train step via the schedules."""
    from minitron_megatron.checkpoint.dist import load_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.config.train import OptimConfig
    from minitron_megatron.model import build_gpt_model, count_model_parameters, parameter_count
    from minitron_megatron.train.optimizer import build_optimizer, wrap_ddp
    from minitron_megatron.train.step import evaluate_loss, train_step
    from minitron_megatron.trim import apply_plan

    parallel = ParallelConfig(tp=ctx.tp_size, pp=ctx.pp_size)
    model = build_gpt_model(case.model, ctx, parallel, PADDED)
    load_checkpoint(ckpt_root, model, ctx)
    plan = _plan(case, ctx, ctx.tp_size, ctx.pp_size)
    layout = case.pp_layout if ctx.pp_size > 1 else None
    result = apply_plan(model, plan, case.model, ctx, parallel, PADDED, pp_layout=layout)
    cfg, seq = result.model_cfg, case.model.max_position_embeddings
    out = {"weights": _gathered(result.model, ctx, global_names=True),
           "params": count_model_parameters(result.model, ctx), "expected": parameter_count(cfg, PADDED),
           "layers_here": [m.layer_number for m in result.model.decoder.layers],
           "loss": evaluate_loss([result.model], batches(case.model), ctx, 2, 2, seq)["val_loss"]}
    ddp = wrap_ddp(result.model, result.model.config)
    optimizer, scheduler = build_optimizer([ddp], OptimConfig(lr=1e-2, warmup_steps=0), result.model.config, 2,
                                           global_batch_size=4)
    train_step([ddp], optimizer, scheduler, iter(batches(case.model)), ctx, 2, 2, seq)
    out["loss_after_step"] = evaluate_loss([ddp], batches(case.model), ctx, 2, 2, seq)["val_loss"]
    return out


def _tp_worker(rank, world, out_dir):
    """Every TP case at TP=world. At TP=1 also the PP reference (from a saved TP1/PP1
    checkpoint: per-stage init differs from PP=1); at TP=2 the same processes then re-initialise
    as PP=2 and run the PP cases (one launch instead of two)."""
    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.runtime import init_runtime

    out_dir = Path(out_dir)
    ctx = init_runtime(tp=world, pp=1, device="cpu", seed=7)
    results = {name: _tp_case(name, case, ctx) for name, case in CASES.items()}
    if world == 1:
        torch.manual_seed(11)
        save_checkpoint(out_dir / "ckpt", 0, build_gpt_model(GQA, ctx, ParallelConfig(), PADDED), ctx)
        results["pp"] = {name: _pp_case(case, ctx, out_dir / "ckpt") for name, case in PP_CASES.items()}
    if rank == 0:
        torch.save(results, out_dir / f"tp{world}.pt")
    if world == 2:
        _pp_worker(rank, world, 1, str(out_dir.parent / "trim_tp1" / "ckpt"), str(out_dir / "pp2"))


def _pp_worker(rank, world, tp, ckpt_root, out_path):
    from minitron_megatron.runtime import init_runtime

    ctx = init_runtime(tp=tp, pp=world // tp, device="cpu", seed=7)
    results = {name: _pp_case(case, ctx, ckpt_root) for name, case in PP_CASES.items()}
    if ctx.tp_rank == 0:
        torch.save(results, f"{out_path}.stage{ctx.pp_rank}")


# ---- fixtures: one launch per layout -------------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("trim")


@pytest.fixture(scope="module")
def tp1(root):
    (root / "trim_tp1").mkdir()
    run_distributed(_tp_worker, 1, str(root / "trim_tp1"))
    return torch.load(root / "trim_tp1" / "tp1.pt")


@pytest.fixture(scope="module")
def tp2(root, tp1):
    """TP=2 results, and PP=2 results of the same launch (needs tp1's checkpoint)."""
    (root / "trim_tp2").mkdir()
    run_distributed(_tp_worker, 2, str(root / "trim_tp2"))
    return torch.load(root / "trim_tp2" / "tp2.pt"), _merge_stages(root / "trim_tp2" / "pp2", stages=2)


def _merge_stages(prefix, stages: int):
    per_stage = [torch.load(f"{prefix}.stage{s}") for s in range(stages)]
    merged = {}
    for name in PP_CASES:
        results = [s[name] for s in per_stage]
        merged[name] = {**results[-1], "weights": {k: v for r in results for k, v in r["weights"].items()},
                        "layers_per_stage": [r["layers_here"] for r in results]}
    return merged


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_tp1_trim_matches_reference_slicing(tp1, name):
    """Catches wrong index arithmetic (QKV group interleave, GLU halves, head slots, layer
    renumbering, residual folding, biases, tied/learned embeddings): TP=1 trimming must equal
    plain slicing of the full weights, bit for bit, and count exactly its config's parameters."""
    from minitron_megatron.trim import TrimPlan

    got = tp1[name]
    expected = reference_trim(got["original"], TrimPlan.from_json(got["plan"]), CASES[name].model)
    assert sorted(got["weights"]) == sorted(expected)
    for key in expected:
        assert torch.equal(got["weights"][key], expected[key]), key
    assert got["params"] == got["expected"] == sum(w.numel() for w in got["weights"].values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_tp2_trim_matches_tp1(tp1, tp2, name):
    """Catches resharding bugs (units sent to the wrong rank, uneven kept counts, stride-2
    fc1 halves split apart, replicated dims sliced differently per rank, partition sizes not
    updated): the same plan at TP=2 gives the TP=1 weights exactly, the same logits, the
    same parameter count, and the same loss after one SGD step (so backward agrees too)."""
    ref, got = tp1[name], tp2[0][name]
    assert got["plan"] == ref["plan"]
    for key, value in ref["weights"].items():
        assert torch.equal(got["weights"][key], value), key
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    assert got["params"] == got["expected"] == ref["params"]
    assert math.isclose(got["loss_after_step"].item(), ref["loss_after_step"].item(), rel_tol=1e-5)


def test_keep_everything_is_identity(tp1, tp2):
    """Catches a trimmer that perturbs what it should keep (e.g. misordered shards)."""
    for run in (tp1, tp2[0]):
        keep = run["keep"]
        assert torch.equal(keep["logits"], keep["logits_before"])
        for key, value in keep["original"].items():
            assert torch.equal(keep["weights"][key], value), key


def test_magnitude_scores_same_at_every_tp(tp1, tp2):
    """Catches magnitude scores that miss the TP reduction or double-count replicated norms:
    every rank must derive the TP=1 plan."""
    for key, value in tp1["keep"]["magnitude"].items():
        torch.testing.assert_close(tp2[0]["keep"]["magnitude"][key], value, rtol=1e-5, atol=0, msg=key)


def _check_pp(ref, got):
    for name in PP_CASES:
        r, g = ref[name], got[name]
        assert sorted(g["weights"]) == sorted(r["weights"]), name
        for key, value in r["weights"].items():
            assert torch.equal(g["weights"][key], value), (name, key)
        assert g["params"] == g["expected"] == r["params"]
        assert math.isclose(g["loss"], r["loss"], rel_tol=1e-5), (name, g["loss"], r["loss"])
        assert math.isclose(g["loss_after_step"], r["loss_after_step"], rel_tol=1e-4), name


def test_pp2_trim_matches_tp1(tp1, tp2):
    """Catches layers moved to the wrong stage or misnumbered, a lost p2p transfer, and a
    pipeline layout (even or explicit [1, 2]) ignored: PP=2 trimming gives the TP=1 weights,
    loss through the pipeline schedule, and loss after one Megatron optimizer step."""
    got = tp2[1]
    assert got["pp_layout"]["layers_per_stage"] == [[1], [2, 3]]
    assert got["pp_width_depth"]["layers_per_stage"] == [[1], [2]]
    _check_pp(tp1["pp"], got)


def test_tp2_pp2_trim_matches_tp1(root, tp1):
    """Catches interactions of TP resharding with stage moves (a layer resharded on one
    stage and sent to the same TP rank of another)."""
    run_distributed(_pp_worker, 4, 2, str(root / "trim_tp1" / "ckpt"), str(root / "tp2pp2"))
    _check_pp(tp1["pp"], _merge_stages(root / "tp2pp2", stages=2))
