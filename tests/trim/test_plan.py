"""Trim targets and plans: pure index arithmetic, no processes."""

import pytest
import torch

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import TrimTarget
from minitron_megatron.errors import ConfigError
from minitron_megatron.model import parameter_count
from minitron_megatron.trim import TrimPlan, keep_plan, plan_from_scores, random_scores, validate_target
from minitron_megatron.trim.plan import fold_pairs, top_k
from minitron_megatron.trim.reshard import UnitPlan, from_units, to_units

GQA = ModelConfig(name="t", num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8,
                  num_query_groups=4, kv_channels=8,
                  max_position_embeddings=16, vocab_size=250, make_vocab_size_divisible_by=64)
MHA = ModelConfig(name="m", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=None, kv_channels=None, max_position_embeddings=16, vocab_size=250)


def test_every_violation_in_one_message():
    """Catches validation that stops at the first problem (users fix one, rerun, hit the next)."""
    target = TrimTarget(hidden_size=100, ffn_hidden_size=90, num_attention_heads=6, num_layers=0)
    with pytest.raises(ConfigError) as err:
        validate_target(GQA, target, tp=4, pp=2)
    text = str(err.value)
    for needle in ("hidden_size=100 must be between 1 and the original model.hidden_size=64",
                   "num_layers=0 must be between", "num_attention_heads=6 must be a multiple",
                   "parallel.tp=4 does not divide the pruned num_attention_heads=6",
                   "parallel.tp=4 does not divide the pruned ffn_hidden_size=90"):
        assert needle in text, text
    assert len(err.value.problems) == 5  # an out-of-range value adds no follow-on noise
    with pytest.raises(ConfigError) as err:
        validate_target(GQA, TrimTarget(num_layers=1), tp=1, pp=2)
    assert "fewer than parallel.pp=2" in str(err.value)


def test_gqa_rules():
    """Catches head pruning that changes the group count or heads per group inconsistently."""
    assert (validate_target(GQA, TrimTarget(num_attention_heads=4)).num_query_groups) == 4  # 1 per group
    new = validate_target(GQA, TrimTarget(num_query_groups=2))
    assert (new.num_attention_heads, new.num_query_groups) == (4, 2)  # whole groups, 2 heads each
    with pytest.raises(ConfigError, match="heads per group"):
        validate_target(GQA, TrimTarget(num_attention_heads=6, num_query_groups=2))  # 3 > 2 per group
    with pytest.raises(ConfigError, match="does not divide the pruned num_query_groups=3"):
        validate_target(GQA, TrimTarget(num_attention_heads=6, num_query_groups=3), tp=2)
    mha = validate_target(MHA, TrimTarget(num_attention_heads=2))
    assert (mha.num_attention_heads, mha.num_query_groups, mha.kv_channels) == (2, 2, 16)  # head dim kept


def test_layers_and_pipeline_layout():
    with pytest.raises(ConfigError) as err:
        validate_target(GQA, TrimTarget(drop_layers=[1, 1, 7], num_layers=3), pp=2, pp_layout=[2, 2])
    text = str(err.value)
    assert "outside 0..3" in text and "twice" in text and "disagrees" in text
    assert validate_target(GQA, TrimTarget(drop_layers=[3]), pp=2, pp_layout=[1, 2]).num_layers == 3
    with pytest.raises(ConfigError, match="summing to the pruned num_layers=3"):
        validate_target(GQA, TrimTarget(num_layers=3), pp=2, pp_layout=[2, 2])


def test_param_budget_resolves_to_widths():
    """Catches a budget rule that overshoots the budget or is not the largest fit on its path."""
    before = parameter_count(GQA, 256)
    new = validate_target(GQA, TrimTarget(param_budget=0.6), tp=2, padded_vocab=256)
    after = parameter_count(new, 256)
    assert after <= 0.6 * before
    assert new.ffn_hidden_size % 2 == 0 and new.num_attention_heads == 8
    bigger = new.__class__(**{**new.__dict__, "hidden_size": new.hidden_size + 8})
    assert parameter_count(bigger, 256) > 0.6 * before or new.hidden_size == GQA.hidden_size
    with pytest.raises(ConfigError, match="unset prune.target.hidden_size"):
        validate_target(GQA, TrimTarget(param_budget=0.5, hidden_size=32), padded_vocab=256)
    with pytest.raises(ConfigError, match="below the smallest"):
        validate_target(GQA, TrimTarget(param_budget=0.01), padded_vocab=256)


def _scores():
    scores = random_scores(GQA, seed=3)
    scores["attn.group"][:, :2] += 10  # groups 0 and 1 win everywhere
    return scores


def test_plan_from_scores_keeps_the_top_units_in_order():
    new = validate_target(GQA, TrimTarget(hidden_size=40, num_attention_heads=2, num_query_groups=2,
                                          ffn_hidden_size=96, num_layers=3))
    scores = _scores()
    plan = plan_from_scores(GQA, new, scores, depth_metric="loss_drop")
    assert plan.layers == top_k(scores["depth.loss_drop"], 3) and plan.layers == sorted(plan.layers)
    assert plan.hidden == top_k(scores["hidden.channel"], 40)
    for j, i in enumerate(plan.layers):
        assert plan.groups[j] == [0, 1]
        heads = scores["attn.head"][i]
        for g, head in zip(plan.groups[j], plan.heads[j]):  # one head per kept group: its best
            assert head == 2 * g + int(heads[2 * g + 1] > heads[2 * g])
        assert plan.ffn[j] == top_k(scores["mlp.neuron"][i], 96)
    assert plan.target_config(GQA) == new
    assert TrimPlan.from_json(plan.to_json()) == plan


def test_depth_contiguous_and_explicit():
    new = validate_target(GQA, TrimTarget(num_layers=2))
    scores = {"depth.contiguous": torch.tensor([3.0, 0.5, 2.0])}  # blocks (0,1) (1,2) (2,3)
    assert plan_from_scores(GQA, new, scores, depth_metric="contiguous").layers == [0, 3]
    with pytest.raises(ConfigError, match="cannot drop 1"):
        plan_from_scores(GQA, validate_target(GQA, TrimTarget(num_layers=3)), scores, depth_metric="contiguous")
    explicit = validate_target(GQA, TrimTarget(drop_layers=[0, 2]))
    assert plan_from_scores(GQA, explicit, {}, drop_layers=[0, 2]).layers == [1, 3]


def test_missing_or_misshapen_scores_are_reported_together():
    new = validate_target(GQA, TrimTarget(hidden_size=32, ffn_hidden_size=64))
    with pytest.raises(ConfigError) as err:
        plan_from_scores(GQA, new, {"mlp.neuron": torch.zeros(4, 10)})
    assert len(err.value.problems) == 2


def test_fold_pairs_follow_the_paper_rule():
    """L=4 heads by importance [a, b, c, d], K=2 kept: b absorbs c (i=2 -> 2K-i+1=3); with K=3 of
    L=4, c absorbs d; with K=1 of L=4, a absorbs b."""
    assert fold_pairs(["a", "b", "c", "d"], 2) == [("a", "d"), ("b", "c")]
    assert fold_pairs(["a", "b", "c", "d"], 3) == [("c", "d")]
    assert fold_pairs(["a", "b", "c", "d"], 1) == [("a", "b")]


def test_keep_plan_is_identity():
    plan = keep_plan(GQA)
    assert plan.is_identity() and plan.target_config(GQA) == GQA.resolved()
    assert not plan_from_scores(GQA, validate_target(GQA, TrimTarget(hidden_size=32)), _scores()).is_identity()


def test_unit_view_round_trip_and_move_counts():
    """Catches a GLU unit view that splits a neuron's gate and up rows apart."""
    fc1 = torch.arange(2 * 5 * 3).reshape(10, 3)  # [gate_r (5); up_r (5)] x h=3
    u = to_units(fc1, 0, 2, 5)
    assert u.shape == (5, 2, 1, 3) and torch.equal(u[1, 1, 0], fc1[6])  # neuron 1's up row
    assert torch.equal(from_units(u, 0), fc1)
    plan = UnitPlan(units=8, kept=[0, 1, 2, 5])  # rank 0 keeps 3, rank 1 keeps 1
    assert plan.counts(2) == [[2, 1], [0, 1]]


def test_megatron_lm_args_describe_the_pruned_model():
    """Catches Megatron-LM args that would rebuild a different model: head dim derived from
    hidden/heads, GQA flags missing, a vocab padding that misses the checkpoint's rows."""
    from minitron_megatron.checkpoint.megatron_lm import pretrain_gpt_args

    new = validate_target(GQA, TrimTarget(hidden_size=48, num_attention_heads=4, num_query_groups=2, num_layers=3))
    args = pretrain_gpt_args(new, 256, "runs/pruned", tp=2)
    value = {k: args[i + 1] for i, k in enumerate(args[:-1]) if k.startswith("--")}
    assert value["--kv-channels"] == "8" and value["--num-query-groups"] == "2" and value["--num-layers"] == "3"
    assert value["--make-vocab-size-divisible-by"] == "128"  # Megatron-LM pads to 128 x TP=2 = 256
    assert {"--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--finetune"} <= set(args)
    assert value["--load"] == "runs/pruned/checkpoint"
