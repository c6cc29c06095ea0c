"""Trimming mixture-of-experts models: routed experts, expert FFN width, the shared expert and
hidden channels, with layers dropped, at EP=2, TP=2 and PP=2 against one rank, and the one-rank
trim against plain slicing of the full weights.

One checkpoint (saved at one rank) is loaded by every layout, so all start from the same weights.
"""

from pathlib import Path

import pytest
import torch

from minitron_megatron.config.prune import TrimTarget
from tests.dist_utils import run_distributed
from tests.model_utils import small_model

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.compat

MOE = dict(num_layers=4, hidden_size=32, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=48,
           moe_shared_expert_intermediate_size=32, moe_aux_loss_coeff=1e-2)
# Hidden 32 -> 24, experts 8 -> 4 (each 48 -> 24 neurons), shared 32 -> 16, layers 0 and 1 dropped
# (old layer 2 moves from stage 1 to stage 0 at PP=2).
TARGET = TrimTarget(hidden_size=24, num_moe_experts=4, moe_ffn_hidden_size=24,
                    moe_shared_expert_intermediate_size=16, drop_layers=[0, 1])
# Kept experts chosen so that at EP=2 (old owners: 0-3 on rank 0, 4-7 on rank 1; new: 2 each)
# layer 2's expert 3 moves rank 0 -> 1 and layer 3's experts 4, 5 move rank 1 -> 0.
KEEP_EXPERTS = {2: [1, 2, 3, 6], 3: [4, 5, 6, 7]}
# name: (tp, pp, ep), world 2
LAYOUTS = {"ep2": (1, 1, 2), "tp2": (2, 1, 1), "pp2": (1, 2, 1)}


def _cfg():
    return small_model(**MOE)


def _scores(cfg):
    from minitron_megatron.trim import random_scores

    scores = random_scores(cfg, seed=5)
    experts = torch.rand(cfg.num_layers, cfg.num_moe_experts, generator=torch.Generator().manual_seed(3))
    for layer, kept in KEEP_EXPERTS.items():
        experts[layer, kept] += 1.0
    scores["moe.expert"] = experts
    return scores


def _gathered(model, cfg, ctx) -> dict:
    """{global name: full tensor} on every rank: TP shards joined, layers and experts renamed to
    their global indices."""
    import torch.distributed as dist

    from minitron_megatron.model import layout as L
    from minitron_megatron.model.modules import is_routed_expert_param
    from tests.model_utils import gather_tp

    num_local = cfg.num_moe_experts // ctx.ep_size
    mine = {}
    for name, p in model.named_parameters():
        key = name
        in_layer = L.split_layer_name(name)
        if in_layer:
            local, suffix = in_layer
            expert = L.expert_of(suffix)
            if expert:
                suffix = L.expert_param_name(ctx.ep_rank * num_local + expert[0], expert[1])
            key = f"decoder.layers.{model.decoder.layers[local].layer_number - 1}.{suffix}"
        # Experts are whole on their EP rank (expert TP is 1), though Megatron marks them TP-parallel.
        mine[key] = p.data.clone() if is_routed_expert_param(name) else gather_tp(p.data, p, ctx.tp_group, ctx.tp_size)
    every = [None] * ctx.world_size
    dist.all_gather_object(every, mine)
    return {name: t for rank_params in every for name, t in rank_params.items()}


def _trim(ctx, ckpt_root) -> dict:
    from minitron_megatron.checkpoint.dist import load_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model, count_model_parameters, padded_vocab_size, parameter_count
    from minitron_megatron.trim import apply_plan, magnitude_scores, plan_from_scores, validate_target

    cfg = _cfg()
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    parallel = ParallelConfig(tp=ctx.tp_size, pp=ctx.pp_size, ep=ctx.ep_size)
    model = build_gpt_model(cfg, ctx, parallel, padded, init="none")
    load_checkpoint(ckpt_root, model, ctx)
    out = {"original": _gathered(model, cfg, ctx), "magnitude": magnitude_scores(model, cfg, ctx)}
    new_cfg = validate_target(cfg, TARGET, ctx.tp_size, ctx.pp_size, None, padded, ep=ctx.ep_size)
    plan = plan_from_scores(cfg, new_cfg, _scores(cfg), drop_layers=TARGET.drop_layers,
                            expert_metric="output_norm")
    result = apply_plan(model, plan, cfg, ctx, parallel, padded)
    out.update(plan=plan.to_json(), weights=_gathered(result.model, result.model_cfg, ctx),
               params=count_model_parameters(result.model, ctx), expected=parameter_count(result.model_cfg, padded))
    return out


def reference_worker(rank, world, out_dir):
    from minitron_megatron.checkpoint.dist import save_checkpoint
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model, padded_vocab_size
    from minitron_megatron.runtime import init_runtime

    cfg = _cfg()
    ctx = init_runtime(tp=1, pp=1, ep=1, device="cpu", seed=7)
    model = build_gpt_model(cfg, ctx, ParallelConfig(), padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1))
    save_checkpoint(Path(out_dir) / "ckpt", 0, model, ctx)
    torch.save(_trim(ctx, Path(out_dir) / "ckpt"), Path(out_dir) / "ref.pt")


def parallel_worker(rank, world, out_dir, layouts):
    from minitron_megatron.runtime import init_runtime

    for layout in layouts:
        tp, pp, ep = LAYOUTS[layout]
        ctx = init_runtime(tp=tp, pp=pp, ep=ep, device="cpu", seed=7)
        result = _trim(ctx, Path(out_dir) / "ckpt")
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{layout}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_trim")
    run_distributed(reference_worker, 1, str(out))
    run_distributed(parallel_worker, 2, str(out), list(LAYOUTS))
    return out


def _reference_trim(original: dict, plan, cfg) -> dict:
    """The pruned model's weights by plain slicing of the full ones (names global)."""
    hidden = torch.tensor(plan.hidden)
    width = cfg.moe_ffn_hidden_size
    shared = cfg.moe_shared_expert_intermediate_size
    out = {}
    for name, w in original.items():
        if not name.startswith("decoder.layers."):
            out[name] = w.index_select(1 if w.dim() == 2 else 0, hidden)  # embeddings, output, final norm
    for j, i in enumerate(plan.layers):
        old, new = f"decoder.layers.{i}.", f"decoder.layers.{j}."
        for suffix in ("input_layernorm.weight", "pre_mlp_layernorm.weight"):
            out[new + suffix] = original[old + suffix][hidden]
        out[new + "self_attention.linear_qkv.weight"] = original[old + "self_attention.linear_qkv.weight"][:, hidden]
        out[new + "self_attention.linear_proj.weight"] = original[old + "self_attention.linear_proj.weight"][hidden]
        out[new + "mlp.router.weight"] = original[old + "mlp.router.weight"][plan.experts[j]][:, hidden]
        for k, e in enumerate(plan.experts[j]):
            keep = torch.tensor(plan.expert_ffn[j][k])
            fc1 = original[f"{old}mlp.experts.local_experts.{e}.linear_fc1.weight"]  # [gate; up]
            out[f"{new}mlp.experts.local_experts.{k}.linear_fc1.weight"] = \
                torch.cat([fc1[:width][keep], fc1[width:][keep]])[:, hidden]
            fc2 = original[f"{old}mlp.experts.local_experts.{e}.linear_fc2.weight"]
            out[f"{new}mlp.experts.local_experts.{k}.linear_fc2.weight"] = fc2[hidden][:, keep]
        keep = torch.tensor(plan.shared_ffn[j])
        fc1 = original[old + "mlp.shared_experts.linear_fc1.weight"]
        out[new + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([fc1[:shared][keep], fc1[shared:][keep]])[:, hidden]
        out[new + "mlp.shared_experts.linear_fc2.weight"] = original[old + "mlp.shared_experts.linear_fc2.weight"][hidden][:, keep]
    return out


def test_one_rank_moe_trim_matches_reference_slicing(runs):
    """Catches wrong expert or neuron bookkeeping: router rows not following their experts, an
    expert keeping another expert's neurons (or one pooled set), GLU halves of expert and shared
    FFNs split apart, hidden channels not sliced from router, experts or shared expert, and a
    pruned config whose parameter count is not the model's."""
    from minitron_megatron.trim import TrimPlan

    ref = torch.load(runs / "ref.pt")
    plan = TrimPlan.from_json(ref["plan"])
    assert plan.experts == [KEEP_EXPERTS[2], KEEP_EXPERTS[3]] and plan.layers == [2, 3]
    assert len({tuple(n) for n in plan.expert_ffn[0]}) > 1  # each expert keeps its own neurons
    expected = _reference_trim(ref["original"], plan, _cfg())
    assert sorted(ref["weights"]) == sorted(expected)
    for name, w in expected.items():
        torch.testing.assert_close(ref["weights"][name], w, rtol=0, atol=0, msg=name)
    assert ref["params"] == ref["expected"] == sum(w.numel() for w in expected.values())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharded_moe_trim_equals_one_rank(runs, layout):
    """Catches experts sent to the wrong EP rank or left on their old owner (the new owner would
    hold a neighbour's weights), a local expert index taken for a global one, a trimmed MoE layer
    lost or misnamed when it changes pipeline stage, shared-expert neurons kept per TP rank
    instead of globally, and magnitude scores counting experts once per replica or per TP rank."""
    ref = torch.load(runs / "ref.pt")
    got = torch.load(runs / f"{layout}.pt")
    assert got["plan"] == ref["plan"]
    assert sorted(got["weights"]) == sorted(ref["weights"])
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=0, atol=0, msg=name)
    assert got["params"] == ref["params"]
    for key, score in ref["magnitude"].items():
        torch.testing.assert_close(got["magnitude"][key], score, rtol=1e-6, atol=0, msg=key)


def test_moe_targets_that_cannot_work_are_refused_together():
    """Catches a MoE target reaching Megatron's build-time asserts or a silent no-op: experts EP
    cannot split (with the feasible counts named), fewer experts than the router's top-k, a dense
    ffn_hidden_size or a param_budget on a MoE model, a shared-expert width on a model without
    one, a shared width TP cannot split, and MoE targets on a dense model."""
    from dataclasses import replace

    from minitron_megatron.errors import ConfigError
    from minitron_megatron.trim import validate_target

    cfg = _cfg()
    with pytest.raises(ConfigError) as err:
        validate_target(cfg, TrimTarget(num_moe_experts=5, ffn_hidden_size=64, moe_shared_expert_intermediate_size=15),
                        tp=2, ep=2)
    problems = err.value.problems
    assert len(problems) == 3, problems
    assert any("prune.target.num_moe_experts=5 is not feasible with parallel.ep=2" in p
               and "feasible counts: [2, 4, 6, 8]" in p for p in problems)
    assert any("prune.target.ffn_hidden_size" in p and "moe_ffn_hidden_size" in p for p in problems)
    assert any("parallel.tp=2 does not divide prune.target.moe_shared_expert_intermediate_size=15" in p for p in problems)
    with pytest.raises(ConfigError, match=r"feasible counts: \[2, 3, 4, 5, 6, 7, 8\]"):
        validate_target(cfg, TrimTarget(num_moe_experts=1))  # top-2 routing needs 2 experts
    with pytest.raises(ConfigError, match=r"param_budget is for dense models; .* give prune.target.num_moe_experts / "
                       r"moe_ffn_hidden_size / moe_shared_expert_intermediate_size / hidden_size .*search.budget_kind"):
        validate_target(cfg, TrimTarget(param_budget=0.5))
    with pytest.raises(ConfigError, match="the model has no shared expert"):
        validate_target(replace(cfg, moe_shared_expert_intermediate_size=None),
                        TrimTarget(moe_shared_expert_intermediate_size=8))
    with pytest.raises(ConfigError, match=r"prune.target.num_moe_experts needs a mixture-of-experts model"):
        validate_target(small_model(), TrimTarget(num_moe_experts=4))
    new = validate_target(cfg, TrimTarget(num_moe_experts=4, moe_ffn_hidden_size=24), ep=2)
    assert (new.num_moe_experts, new.moe_ffn_hidden_size, new.moe_shared_expert_intermediate_size) == (4, 24, 32)


def test_expert_metric_picks_the_score_that_ranks_experts():
    """Catches prune.expert_metric being ignored: output_norm keeps the experts with the largest
    moe.expert, frequency those the router picks most, whichever the other score says, and
    contribution ranks by their product."""
    from minitron_megatron.trim import plan_from_scores, validate_target

    cfg = _cfg()
    scores = _scores(cfg)
    scores["moe.expert_frequency"] = torch.arange(8.0).repeat(cfg.num_layers, 1)  # experts 4-7 most routed
    new = validate_target(cfg, TrimTarget(num_moe_experts=4))
    by_norm = plan_from_scores(cfg, new, scores, expert_metric="output_norm")
    by_frequency = plan_from_scores(cfg, new, scores, expert_metric="frequency")
    assert by_norm.experts[2] == KEEP_EXPERTS[2] and by_norm.notes["expert_metric"] == "output_norm"
    assert by_frequency.experts == [[4, 5, 6, 7]] * cfg.num_layers
    assert by_frequency.target_config(cfg).num_moe_experts == 4
    scores["moe.expert"] = torch.tensor([8.0, 1, 1, 1, 1, 1, 1, 0.5]).repeat(cfg.num_layers, 1)
    scores["moe.expert_frequency"] = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 100]).repeat(cfg.num_layers, 1)
    by_product = plan_from_scores(cfg, new, scores, expert_metric="contribution")  # 8, 2, 3, ..., 7, 50
    assert by_product.experts == [[0, 5, 6, 7]] * cfg.num_layers
