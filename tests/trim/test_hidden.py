"""Hidden-channel variants from the per-norm rows, the rescale factors, and their settings."""

import pytest
import torch

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.config.prune import PruneConfig
from minitron_megatron.errors import ConfigError
from minitron_megatron.trim.apply import rescale_norms
from minitron_megatron.trim.hidden import MOMENTS_KEY, combine_hidden, rescale_factors, validate_hidden
from minitron_megatron.trim.plan import keep_plan
from minitron_megatron.trim.stage import make_plan

L, H = 2, 6


def _by_norm():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(2 * L + 1, H, generator=gen) * torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]).unsqueeze(1)


@pytest.mark.parametrize("norms, rows", [("all", [0, 1, 2, 3, 4]), ("layers", [0, 1, 2, 3]),
                                         ("input", [0, 2]), ("pre_mlp", [1, 3])])
def test_norm_selection_and_combination(norms, rows):
    """Catches the final norm kept in `layers`, input/pre-MLP rows swapped, or normalised rows
    that are not each divided by their own sum."""
    by_norm = _by_norm()
    torch.testing.assert_close(combine_hidden(by_norm, norms, "sum"), by_norm[rows].double().sum(0))
    expected = sum(by_norm[r].double() / by_norm[r].double().sum() for r in rows)
    torch.testing.assert_close(combine_hidden(by_norm, norms, "normalized"), expected)


def test_rescale_factors_match_their_definition():
    """Catches a ratio over the wrong channels or inverted: RMSNorm's factor is the token RMS
    of rms_kept(z) / rms_full(z), LayerNorm's the std of the kept z (shift: their mean)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(500, H, generator=gen) * torch.tensor([0.1, 3.0, 1.0, 0.5, 2.0, 1.0]) + 0.7
    kept = [1, 2, 4]
    z_rms = torch.nn.functional.rms_norm(x, (H,), eps=1e-5).double()
    z_ln = torch.nn.functional.layer_norm(x, (H,), eps=1e-5).double()
    rows = lambda z: torch.stack([z.mean(0), z.square().mean(0)]).unsqueeze(0).repeat(2 * L + 1, 1, 1)  # noqa
    scale, shift = rescale_factors(rows(z_rms), kept, "RMSNorm")
    assert scale[0] == pytest.approx(z_rms[:, kept].square().mean().sqrt().item()) and shift[0] == 0
    scale, shift = rescale_factors(rows(z_ln), kept, "LayerNorm")
    m = z_ln[:, kept].mean()
    assert scale[3] == pytest.approx((z_ln[:, kept].square().mean() - m * m).sqrt().item())
    assert shift[3] == pytest.approx(m.item())
    absent = torch.zeros(2 * L + 1, 2, H)
    assert rescale_factors(absent, kept, "RMSNorm") == ([1.0] * (2 * L + 1), [0.0] * (2 * L + 1))


def test_rescale_folds_into_the_real_gamma():
    """Catches the factor applied to the stored gamma - 1 of zero-centred norms, or the bias
    shift missing/with the wrong gamma: gamma' = gamma * s, beta' = beta + gamma * shift."""
    cfg = ModelConfig(name="t", num_layers=L, hidden_size=H, ffn_hidden_size=8, num_attention_heads=2,
                      normalization="LayerNorm", layernorm_zero_centered_gamma=True)
    plan = keep_plan(cfg)
    plan.norm_scale, plan.norm_shift = [1.0, 1.0, 2.0, 1.0, 3.0], [0.0, 0.0, 0.5, 0.0, -1.0]
    stored, bias = torch.full((H,), 0.5), torch.ones(H)  # gamma = 1.5
    names = ["decoder.layers.1.input_layernorm.weight", "decoder.layers.1.input_layernorm.bias",
             "decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "decoder.layers.0.mlp.linear_fc1.weight"]
    w, b, fw, fb, other = rescale_norms(names, [stored, bias, stored, bias, stored], plan, cfg)
    torch.testing.assert_close(w, torch.full((H,), 1.5 * 2 - 1))
    torch.testing.assert_close(b, torch.full((H,), 1 + 1.5 * 0.5))
    torch.testing.assert_close(fw, torch.full((H,), 1.5 * 3 - 1))
    torch.testing.assert_close(fb, torch.full((H,), 1 - 1.5))
    assert other is stored


def test_bad_hidden_settings_name_the_setting():
    problems = validate_hidden("final", "weighted", "maybe")
    assert len(problems) == 3
    assert "prune.importance.hidden_norms='final'" in problems[0] and "'layers'" in problems[0]
    assert "prune.importance.hidden_combine='weighted'" in problems[1]
    assert "prune.norm_rescale='maybe'" in problems[2]
    assert validate_hidden("layers", "normalized", True) == validate_hidden("all", "sum", "False") == []


def test_rescale_needs_the_moments():
    """Scores saved before the per-norm moments existed cannot be rescaled: one clear error."""
    cfg = ModelConfig(name="t", num_layers=L, hidden_size=H, ffn_hidden_size=8, num_attention_heads=2)
    new = ModelConfig(name="t", num_layers=L, hidden_size=4, ffn_hidden_size=8, num_attention_heads=2)
    prune = PruneConfig(norm_rescale="calibrated")
    with pytest.raises(ConfigError, match="prune.norm_rescale=calibrated needs 'hidden.norm_moments'"):
        make_plan(prune, cfg, new, scores={"hidden.channel": torch.rand(H)})


def test_auto_rescale_calibrates_only_with_the_moments():
    """The default (auto): the calibrated factors when the scores carry the moments, exactly
    as an explicit `calibrated`; the plain slice, said in the plan's notes, when they do not
    (random/magnitude baselines, older score files)."""
    cfg = ModelConfig(name="t", num_layers=L, hidden_size=H, ffn_hidden_size=8, num_attention_heads=2)
    new = ModelConfig(name="t", num_layers=L, hidden_size=4, ffn_hidden_size=8, num_attention_heads=2)
    assert PruneConfig().norm_rescale == "auto"
    gen = torch.Generator().manual_seed(0)
    z2 = torch.rand(2 * L + 1, H, generator=gen) * 3
    moments = torch.stack([torch.zeros(2 * L + 1, H), z2], 1)  # [2L+1, 2, h]: E[z], E[z^2]
    with_moments = {"hidden.channel": torch.rand(H, generator=gen), MOMENTS_KEY: moments}
    auto = make_plan(PruneConfig(), cfg, new, scores=with_moments)
    calibrated = make_plan(PruneConfig(norm_rescale="calibrated"), cfg, new, scores=with_moments)
    assert auto.notes["norm_rescale"] == "calibrated"
    assert auto.norm_scale == calibrated.norm_scale and auto.norm_scale and any(s != 1 for s in auto.norm_scale)
    old = make_plan(PruneConfig(), cfg, new, scores={"hidden.channel": with_moments["hidden.channel"]})
    assert old.notes["norm_rescale"].startswith("none (auto") and not old.norm_scale
    assert old.hidden == auto.hidden
    random = make_plan(PruneConfig(method="random"), cfg, new, seed=1)
    assert random.notes["norm_rescale"].startswith("none (auto") and not random.norm_scale
