"""`search` on a mixture-of-experts teacher: the expert axes, and budgets of total or active
parameters (`search.budget_kind`), on the session's trained tiny-moe (tests/conftest.py).

The space below has eight architectures of the 2-layer tiny-moe (hidden 128 -> {128, 96},
experts 8 -> {8, 4}, expert FFN 128 -> {128, 64}). A budget of 0.75 +- 1% of the teacher's
ACTIVE parameters keeps two of them (hidden 96 with expert FFN 128, 8 experts or 4: dropping
experts barely changes what a token uses); 0.75 of the TOTAL keeps only the 8-expert one.
"""

import json
from dataclasses import replace

import pytest

from minitron_megatron.checkpoint import run_dir as rd
from minitron_megatron.config.search import SearchConfig, SearchSpace
from minitron_megatron.errors import ConfigError
from minitron_megatron.model.params import active_parameter_count, parameter_count
from minitron_megatron.search.plan import plan_candidates
from tests.commands import run_command, summary
from tests.model_utils import small_model

SPACE = ["search.space.num_layers=[1.0]", "search.space.num_attention_heads=[1.0]",
         "search.space.hidden_size=[1.0,0.75]", "search.space.num_moe_experts=[1.0,0.5]",
         "search.space.moe_ffn_hidden_size=[1.0,0.5]"]
SEARCH = ["device=cpu", "data=stdlib", "evaluate.samples=8", "evaluate.micro_batch_size=4",
          "prune.importance.calibration_samples=8", "prune.importance.micro_batch_size=4",
          "distill.micro_batch_size=4", "distill.global_batch_size=4", "distill.eval_samples=8",
          "distill.log_interval=1", "distill.optim.warmup_steps=1", "search.steps=2"]
ACTIVE = ["search.budget_kind=active", "search.param_budget=0.75", "search.tolerance=0.01"]
MOE_AXES = ("hidden_size", "num_moe_experts", "moe_ffn_hidden_size")


def built_counts(cfg, padded_vocab):
    """(total, active) parameters of Megatron's GPTModel built from `cfg` on the meta device,
    counted from its parameters: each routed expert's weights count topk / num_moe_experts."""
    from fractions import Fraction

    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.runtime import destroy_runtime, init_runtime

    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=1)
    try:
        model = build_gpt_model(cfg, ctx, ParallelConfig(), padded_vocab, init="meta")
        params = dict(model.named_parameters())
    finally:
        destroy_runtime()
    share = Fraction(cfg.moe_router_topk, cfg.num_moe_experts)
    expert = sum(p.numel() for name, p in params.items() if ".mlp.experts." in name)
    total = sum(p.numel() for p in params.values())
    active = total - expert + expert * share
    assert active.denominator == 1
    return total, int(active)


def search_cmd(teacher, save, *overrides, **kw):
    return run_command("search", f"load={teacher}", *SEARCH, *SPACE, *overrides, f"save={save}", **kw)


@pytest.fixture(scope="module")
def moe_search(tiny_moe, tmp_path_factory):
    """One search of the two candidates within 0.75 +- 1% of the teacher's active parameters."""
    teacher, _ = tiny_moe
    save = tmp_path_factory.mktemp("moe_search") / "search"
    return save, summary(search_cmd(teacher, save, *ACTIVE))


def test_active_budget_lists_candidates_by_exact_active_count(tiny_moe, moe_search):
    """Catches an active count that is not what a token uses (every expert counted, or the router
    or shared parts left out), candidates filtered by the total count when the active one was
    asked for (or approximately), and a space without the expert axes: each candidate's active
    count, from Megatron's model built at its pruned shape, is within 1% of 0.75 x the teacher's,
    and the same budget of total parameters lists other candidates."""
    teacher, _ = tiny_moe
    save, out = moe_search
    cfg, padded, _ = rd.read_model_yaml(teacher)
    teacher_total, teacher_active = built_counts(cfg, padded)
    assert (out["teacher_params"], out["teacher_active_params"]) == (teacher_total, teacher_active)
    assert out["budget_kind"] == "active" and out["budget"] == round(0.75 * teacher_active)
    listed = []
    for e in out["candidates"]:
        student_cfg, student_padded, _ = rd.read_model_yaml(save / e["pruned"])
        total, active = built_counts(student_cfg, student_padded)
        assert (e["params"], e["active_params"]) == (total, active), e
        assert abs(active - 0.75 * teacher_active) <= 0.01 * 0.75 * teacher_active
        assert rd.read_summary(save / e["pruned"])["params_after"] == total
        listed.append(tuple(e["arch"][a] for a in MOE_AXES))
    assert listed == [(96, 8, 128), (96, 4, 128)]  # largest active count first
    space = SearchSpace(num_layers=[1.0], num_attention_heads=[1.0], hidden_size=[1.0, 0.75],
                        num_moe_experts=[1.0, 0.5], moe_ffn_hidden_size=[1.0, 0.5])
    by_total = plan_candidates(cfg, cfg, teacher_total, round(0.75 * teacher_total),
                               SearchConfig(space=space, tolerance=0.01), padded, 1, 1)
    assert [tuple(c.arch[a] for a in MOE_AXES) for c in by_total] == [(96, 8, 128)]


def test_moe_search_distils_and_ranks_both_candidates(moe_search):
    """Catches a MoE candidate that cannot be pruned or distilled inside the search (expert
    targets not passed to the trim), and a report without both counts: the search ends with its
    ranked table, each row showing total and active parameters."""
    save, out = moe_search
    assert [e["status"] for e in out["candidates"]] == ["done", "done"]
    assert sorted(e["rank"] for e in out["candidates"]) == [1, 2] and out["best"]["rank"] == 1
    report = (save / "report.md").read_text()
    assert "| active | fraction |" in report and "active per token" in report
    for e in out["candidates"]:
        assert f"{e['params']:,} | {e['params_fraction']:.3f} | {e['active_params']:,} |" in report
        assert f"experts={e['arch']['num_moe_experts']} expert_ffn={e['arch']['moe_ffn_hidden_size']}" in report
    assert json.loads((save / "candidates.json").read_text()) == out["candidates"]


def test_shared_expert_counts_whole_and_is_a_search_axis():
    """Catches a shared expert (and its gate) left out of the active count, or counted as a routed
    expert, and a space without the shared-expert width: the counts equal Megatron's model's."""
    from minitron_megatron.search.space import architectures

    cfg = small_model(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                      moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True).resolved()
    assert built_counts(cfg, 256) == (parameter_count(cfg, 256), active_parameter_count(cfg, 256))
    space = SearchSpace(num_layers=[1.0], num_attention_heads=[1.0], hidden_size=[1.0], num_moe_experts=[1.0],
                        moe_ffn_hidden_size=[1.0], moe_shared_expert_intermediate_size=[1.0, 0.5])
    assert [a["moe_shared_expert_intermediate_size"] for a in architectures(cfg, space, 8)] == [48, 24]


def test_expert_counts_ep_cannot_split_are_left_out_and_dense_active_is_total(tiny_moe):
    """Catches expert counts EP cannot split (or below top-k) reaching a candidate's trim, and
    budget_kind=active meaning something else than the total on a dense model."""
    teacher, _ = tiny_moe
    cfg, padded, _ = rd.read_model_yaml(teacher)
    space = SearchSpace(num_layers=[1.0], num_attention_heads=[1.0], hidden_size=[1.0],
                        num_moe_experts=[1.0, 0.375, 0.125], moe_ffn_hidden_size=[1.0])
    s = SearchConfig(space=space, tolerance=0.9)
    total = parameter_count(cfg, padded)
    experts = {ep: [c.arch["num_moe_experts"] for c in plan_candidates(cfg, cfg, total, total, s, padded, 1, 1, ep)]
               for ep in (1, 2)}
    assert experts == {1: [8, 3], 2: [8]}  # 1 expert < top-2 always; 3 experts not on 2 EP ranks
    dense = small_model(vocab_size=256)
    dense_space = SearchSpace(num_layers=[1.0, 0.5], num_attention_heads=[1.0], hidden_size=[1.0, 0.75],
                              ffn_ratio=[1.0, 0.5])
    assert active_parameter_count(dense, 256) == parameter_count(dense, 256)
    lists = [[c.arch for c in plan_candidates(dense, dense, parameter_count(dense, 256),
                                              parameter_count(dense, 256) // 2,
                                              SearchConfig(space=dense_space, tolerance=0.3, budget_kind=kind),
                                              256, 1, 1)] for kind in ("total", "active")]
    assert lists[0] == lists[1] and lists[0]
    with pytest.raises(ConfigError, match="no architecture of search.space is within"):
        plan_candidates(cfg, cfg, total, total // 100, replace(s, tolerance=0.01), padded, 1, 1)


def test_bad_budget_kind_and_active_budget_above_the_teacher_exit_2(tiny_moe, tmp_path):
    """Catches a misspelt budget kind taken for total, and an active budget larger than what the
    teacher uses per token (possible in total parameters, so easy to mistake): exit 2, one message
    naming the setting, nothing written."""
    teacher, _ = tiny_moe
    proc = search_cmd(teacher, tmp_path / "foo", "search.budget_kind=foo", check=False)
    assert proc.returncode == 2 and "search.budget_kind='foo' is not one of ['total', 'active']" in proc.stderr, \
        proc.stderr[-2000:]
    cfg, padded, _ = rd.read_model_yaml(teacher)
    between = (active_parameter_count(cfg, padded) + parameter_count(cfg, padded)) // 2
    proc = search_cmd(teacher, tmp_path / "above", "search.budget_kind=active", f"search.param_budget={between}",
                      check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"above the teacher's {active_parameter_count(cfg, padded):,} active parameters" in proc.stderr
    assert "nearest feasible architectures" in proc.stderr
    assert not (tmp_path / "foo").exists() and not (tmp_path / "above").exists()
