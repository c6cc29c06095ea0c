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
