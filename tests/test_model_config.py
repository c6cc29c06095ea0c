"""Model config validation and the analytical parameter count (no processes needed)."""

import pytest

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.parallel import ParallelConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.model import padded_vocab_size, parameter_count, pipeline_layer_split, validate_model


def test_padded_vocab_matches_megatron_lm():
    assert padded_vocab_size(4096, 128, 1) == 4096
    assert padded_vocab_size(4097, 128, 1) == 4224
    assert padded_vocab_size(50257, 128, 8) == 51200


def test_validate_lists_every_problem_at_once():
    cfg = ModelConfig(num_attention_heads=6, num_query_groups=3, ffn_hidden_size=640, num_layers=1)
    with pytest.raises(ConfigError) as err:
        validate_model(cfg, ParallelConfig(tp=4, pp=2))
    text = str(err.value)
    for fragment in ("num_attention_heads=6", "num_query_groups=3", "fewer than parallel.pp=2"):
        assert fragment in text, text
    assert "ffn_hidden_size" not in text  # 640 is divisible by 4


def test_validate_accepts_tiny_at_tp2_pp2():
    validate_model(ModelConfig(), ParallelConfig(tp=2, pp=2))


def test_uneven_pipeline_split_puts_remainder_first():
    assert pipeline_layer_split(3, 2) == [2, 1]
    assert pipeline_layer_split(7, 3) == [3, 2, 2]
    assert pipeline_layer_split(4, 2) == [2, 2]


def test_parameter_count_of_tiny_by_hand():
    cfg = ModelConfig(vocab_size=4096)  # 4 layers, h128, 4 heads/2 groups x 32, SwiGLU 384, untied
    per_layer = 128 + 128 * (128 + 2 * 64) + 128 * 128 + 128 + 128 * 768 + 384 * 128
    assert parameter_count(cfg) == 4096 * 128 * 2 + 4 * per_layer + 128


def test_sequence_parallel_needs_te_and_tp():
    with pytest.raises(ConfigError) as err:
        validate_model(ModelConfig(), ParallelConfig(tp=1, sequence_parallel=True))
    assert "needs parallel.tp>1" in str(err.value) and "transformer_impl=transformer_engine" in str(err.value)


MOE = dict(num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=128)


def test_expert_parallel_that_does_not_divide_the_experts_is_refused():
    """Catches an EP size Megatron would assert on at build time (8 experts over 3 ranks):
    one ConfigError naming the setting, the expert count and the allowed sizes."""
    with pytest.raises(ConfigError) as err:
        validate_model(ModelConfig(**MOE), ParallelConfig(ep=3))
    assert err.value.problems == ["parallel.ep=3 does not divide model.num_moe_experts=8; "
                                  "allowed parallel.ep: [1, 2, 4, 8]"]


def test_moe_settings_need_a_moe_model():
    with pytest.raises(ConfigError) as err:
        validate_model(ModelConfig(moe_ffn_hidden_size=64), ParallelConfig(ep=2))
    text = str(err.value)
    assert "parallel.ep=2 needs a mixture-of-experts model" in text
    assert "model.moe_ffn_hidden_size needs model.num_moe_experts" in text


def test_moe_router_settings_are_checked():
    cfg = ModelConfig(**{**MOE, "moe_router_topk": 9}, moe_router_score_function="tanh",
                      moe_shared_expert_intermediate_size=100)
    with pytest.raises(ConfigError) as err:
        validate_model(cfg, ParallelConfig(tp=8, ep=2))
    text = str(err.value)
    assert "moe_router_topk=9 must be in [1, model.num_moe_experts=8]" in text
    assert "model.moe_router_score_function='tanh' is not one of ['softmax', 'sigmoid']" in text
    assert "parallel.tp=8 does not divide model.moe_shared_expert_intermediate_size=100" in text
    with pytest.raises(ConfigError, match=r"parallel.moe_token_dispatcher_type='flex' is not one of "
                                          r"\['allgather', 'alltoall'\]"):
        validate_model(ModelConfig(**MOE), ParallelConfig(moe_token_dispatcher_type="flex"))


def test_moe_training_at_tp2_needs_sequence_parallelism():
    """Megatron's MoELayer raises mid-step when it trains at TP>1 without sequence parallelism:
    the training commands say so before building anything; EP alone is fine."""
    from minitron_megatron.runtime.parallel_rules import moe_training_problems

    assert "parallel.sequence_parallel=true" in moe_training_problems(ModelConfig(**MOE), ParallelConfig(tp=2))[0]
    assert moe_training_problems(ModelConfig(**MOE), ParallelConfig(ep=2)) == []
    assert moe_training_problems(ModelConfig(), ParallelConfig(tp=2)) == []


def test_parameter_count_of_a_moe_by_hand():
    """4 layers, h128, 8 SwiGLU experts of width 128, a gated shared expert of 256, untied."""
    cfg = ModelConfig(vocab_size=4096, **MOE, moe_shared_expert_intermediate_size=256, moe_shared_expert_gate=True)
    attention = 128 + 128 * (128 + 2 * 64) + 128 * 128 + 128
    router, expert, shared = 8 * 128, 128 * 256 + 128 * 128, 128 * 512 + 256 * 128 + 128
    assert parameter_count(cfg) == 4096 * 128 * 2 + 4 * (attention + router + 8 * expert + shared) + 128
