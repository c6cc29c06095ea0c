"""Bad input fails with one clear ConfigError naming the setting, before any forward pass."""

import pytest
import torch

from minitron_megatron.config.prune import ImportanceConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.importance import batches_fn, validate_importance
from minitron_megatron.importance.estimate import check_sample_count
from minitron_megatron.runtime.context import ParallelContext


def _ctx(dp_size=1):
    return ParallelContext(device=torch.device("cpu"), world_size=dp_size, rank=0, tp_size=1, tp_rank=0,
                           pp_size=1, pp_rank=0, dp_size=dp_size, dp_rank=0)


@pytest.mark.parametrize("setting, value, needle", [
    ("batch_agg", "max", "prune.importance.batch_agg='max' is not one of ['mean', 'l2', 'var']"),
    ("seq_agg", "L2", "prune.importance.seq_agg='L2'"),
    ("depth_metrics", ["perplexity"], "prune.importance.depth_metrics has ['perplexity']"),
    ("contiguous_k", 5, "prune.importance.contiguous_k=5 must be in [1, model.num_layers=4]"),
    ("micro_batch_size", 0, "prune.importance.micro_batch_size=0"),
])
def test_bad_settings_are_named(setting, value, needle):
    """Catches a silently accepted typo (e.g. seq_agg=L2 falling back to a default)."""
    with pytest.raises(ConfigError) as err:
        validate_importance(ImportanceConfig(**{setting: value}), num_layers=4)
    assert needle in str(err.value)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate_importance(ImportanceConfig(batch_agg="x", seq_agg="y"), num_layers=4)
    assert len(err.value.problems) == 2


@pytest.mark.parametrize("samples, size, dp, needle", [
    (1, 100, 1, "must be between micro_batch_size x DP size = 4 and the 100 samples"),
    (6, 100, 2, "must be between micro_batch_size x DP size = 8"),
    (200, 100, 1, "and the 100 samples the dataset has"),
    (4, 0, 1, "the dataset has 0 samples"),
    (4, 3, 1, "the dataset has 3 samples, fewer than micro_batch_size x DP size = 4"),
])
def test_too_few_or_too_many_calibration_samples(samples, size, dp, needle):
    """Catches calibration silently running on zero or fewer samples than asked for."""
    with pytest.raises(ConfigError) as err:
        batches_fn([{}] * size, samples, 4, _ctx(dp), "prune.importance.calibration_samples")
    assert needle in str(err.value)
    assert "prune.importance.calibration_samples" in str(err.value)


def test_sample_count_rounds_down_to_whole_steps():
    assert check_sample_count(7, 10, 2, _ctx(), "calib") == 6
    assert check_sample_count(9, 10, 2, _ctx(2), "calib") == 8


def test_model_problems_fail_before_any_forward(reference_run):
    """Catches a layout we cannot score (an MoE-like layer without linear_fc2, a model that is
    not a GPTModel) or unusable data surfacing as a crash mid-pass or as silently missing
    scores: each is a ConfigError raised before the model runs at all."""
    errors = torch.load(reference_run / "errors.pt")
    expected = {
        "layout_no_fc2": "layer 1 has no mlp.linear_fc2 (mlp is IdentityOp)",
        "layout_not_gpt": "expected a Megatron-core GPTModel",
        "unknown_agg": "prune.importance.seq_agg='max'",
        "empty_calibration": "no calibration batches",
        "no_validation_data": "no validation batches",
        "long_samples": "calibration samples have 64 tokens, more than the model's max_position_embeddings=32",
    }
    for name, needle in expected.items():
        message, forward_calls = errors[name]
        assert message is not None and needle in message, (name, message)
        assert forward_calls == 0, name
    # A module that exists but is bypassed can only be noticed by running: error, not zeros.
    message, _ = errors["bypassed_fc2"]
    assert message is not None and "layer1.mlp.linear_fc2 (0/2)" in message, message
