"""Scores against an independent float64 reference (plain PyTorch hooks, direct formulas),
and the Transformer Engine fused-norm layout against the local one."""

import pytest
import torch

from minitron_megatron.model.probes import recompute_fused_norm
from tests.importance import workers
from tests.importance.test_parallel import assert_scores_close


@pytest.mark.parametrize("case", sorted(workers.CASES))
def test_width_and_block_importance_match_float64_reference(reference_run, case):
    """Catches a wrong statistic (e.g. head norms over the wrong axis, aggregating over batch
    before sequence, a sample variance instead of the population one, a missing norm in the
    hidden-channel sum, group = mean instead of sum, BI averaged per layer call instead of per
    token) for every (seq, batch) aggregation."""
    ours = torch.load(reference_run / f"{case}-ref.pt")
    ref = torch.load(reference_run / f"{case}-f64.pt")
    for agg, expected in ref["scores"].items():
        got = {k: v for k, v in ours[agg]["scores"].items() if k in expected}
        assert_scores_close(got, expected, f"{case} {agg}")


@pytest.mark.parametrize("case", sorted(workers.CASES))
def test_loss_depth_metrics_match_deleting_layers(reference_run, case):
    """Catches a layer skip that is not an identity (or skips the wrong layer / block): the
    validation loss with layer i skipped must equal the float64 loss of the model with layer
    i deleted from its ModuleList; loss_drop and contiguous are those minus the baseline."""
    result = torch.load(reference_run / f"{case}-ref.pt")[("mean", "l2")]
    losses = torch.load(reference_run / f"{case}-f64.pt")["losses"]
    depth = result["meta"]["depth"]
    assert depth["baseline_val_loss"] == pytest.approx(losses["baseline"], rel=1e-6)
    assert depth["layer_loss_skipped"] == pytest.approx(losses["layer"], rel=1e-6)
    assert depth["block_loss_skipped"] == pytest.approx(losses["block"], rel=1e-6)
    drop = torch.tensor(losses["layer"]) - losses["baseline"]
    torch.testing.assert_close(result["scores"]["depth.loss_drop"].double(), drop.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(workers.CASES))
def test_fused_norm_layout_matches_local(reference_run, case):
    """Catches a hidden-channel statistic that silently drops the layer norms under
    Transformer Engine's spec (where they are fused into linear_qkv / linear_fc1 and are
    IdentityOp modules) or recomputes them wrongly: the same model rewritten in that
    layout must score identically."""
    local = torch.load(reference_run / f"{case}-ref.pt")
    fused = torch.load(reference_run / f"{case}-fused.pt")
    for agg in local:
        assert_scores_close(fused[agg]["scores"], local[agg]["scores"], f"{case} fused {agg}")


class _FusedLinear(torch.nn.Module):
    """The attributes of a TE LayerNorm*Linear that the recompute reads."""

    def __init__(self, kind, weight, bias, eps, zero_centered):
        super().__init__()
        self.normalization, self.eps, self.zero_centered_gamma = kind, eps, zero_centered
        self.layer_norm_weight = torch.nn.Parameter(weight)
        self.layer_norm_bias = None if bias is None else torch.nn.Parameter(bias)


@pytest.mark.parametrize("zero_centered", [False, True])
@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_recompute_fused_norm_matches_torch_norms(kind, zero_centered):
    """Catches a wrong norm formula, eps placement, a missing bias or zero-centred gamma
    (TE stores gamma - 1) in the recompute of TE's fused norm output."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 16, generator=gen) * 3 + 1  # [s, b, h]
    weight, bias = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    if kind == "RMSNorm":
        norm, bias = torch.nn.RMSNorm(16, eps=1e-5), None
    else:
        norm = torch.nn.LayerNorm(16, eps=1e-5)
        norm.bias.data.copy_(bias)
    norm.weight.data.copy_(weight)
    stored = weight - 1 if zero_centered else weight
    fused = _FusedLinear(kind, stored, bias, 1e-5, zero_centered)
    torch.testing.assert_close(recompute_fused_norm(fused, x), norm(x), rtol=1e-5, atol=1e-6)
