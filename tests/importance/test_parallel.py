"""Importance scores must not depend on how the model is split: TP, PP and DP runs equal
the TP=1/PP=1/DP=1 run (same weights, same samples) for every aggregation."""

import pytest
import torch

from tests.importance import workers

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.compat

REL = 1e-5


def assert_scores_close(got: dict, ref: dict, what: str, rel: float = REL) -> None:
    """Max relative error <= rel per score tensor; loss differences on the loss scale."""
    assert sorted(got) == sorted(ref), what
    for name in ref:
        g, r = got[name].double(), ref[name].double()
        assert g.shape == r.shape, (what, name)
        if name in ("depth.loss_drop", "depth.contiguous"):
            # differences of two ~5.5 losses that each agree to ~1e-6 relative
            torch.testing.assert_close(g, r, rtol=0, atol=2e-5, msg=f"{what} {name}")
            continue
        scale = r.abs()
        if name == "hidden.norm_moments":
            # [rows, (E[z], E[z^2]), h]: a channel's mean E[z] may be ~0 (LayerNorm centres z), so
            # both moments are judged on the channel's own scale, sqrt(E[z^2]) and E[z^2].
            scale = torch.stack([r[:, 1].sqrt(), r[:, 1]], dim=1)
        err = ((g - r).abs() / scale.clamp_min(1e-12)).max().item()
        assert err <= rel, f"{what} {name}: max relative error {err:.3g}"


@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
@pytest.mark.parametrize("case", sorted(workers.CASES))
def test_split_matches_unsplit(parallel_run, case, layout):
    """Catches: TP shards gathered out of order or per-rank heads mis-sized (tp2, with 3 heads
    and 80 neurons per rank); replicated hidden channels counted twice over TP (tp2); local
    instead of global layer indices or a stage's norms lost (pp2, uneven [2,1] and [1,2]
    splits); nonlinear finishes applied before summing over DP ranks (dp2) -- for each of
    the 9 (seq, batch) aggregations, and the depth metrics (layer skipping on the right
    stage, BI token sums). Every rank must hold the very same bits."""
    ref = torch.load(parallel_run / f"{case}-ref.pt")
    ranks = [torch.load(parallel_run / f"{case}-{layout}-rank{r}.pt") for r in range(2)]
    for agg, expected in ref.items():
        for rank, got in enumerate(ranks):
            assert_scores_close(got[agg]["scores"], expected["scores"], f"{case} {layout} {agg} rank{rank}")
            assert got[agg]["meta"]["calibration"] == expected["meta"]["calibration"]
        for name in expected["scores"]:
            assert torch.equal(ranks[0][agg]["scores"][name], ranks[1][agg]["scores"][name]), (agg, name)


def test_sequence_parallel_shards_combine_per_sample(parallel_run):
    """Catches sequence-sharded norm outputs aggregated per shard (a per-shard mean, sqrt or
    variance is not the per-sample one) or Block-Importance token sums not summed over TP:
    norm inputs split [s/2] over two TP ranks, heads/neurons split [n/2], against the
    float64 reference on the unsplit tensors, for every aggregation."""
    for rank in range(2):
        data = torch.load(parallel_run / f"sp-rank{rank}.pt")
        for agg, expected in data["expected"].items():
            got = dict(data["got"][agg])
            got.pop("samples")
            expected = {k: v for k, v in expected.items() if k != "attn.group"}
            assert_scores_close(got, expected, f"sp {agg} rank{rank}", rel=1e-6)


@pytest.fixture(scope="module")
def four_rank_run(reference_run):
    from tests.dist_utils import run_distributed

    run_distributed(workers.parallel_worker, 4, str(reference_run), ["tp2pp2", "tp2dp2"])
    return reference_run


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2pp2", "tp2dp2"])
@pytest.mark.parametrize("case", sorted(workers.CASES))
def test_combined_splits_match_unsplit(four_rank_run, case, layout):
    """Catches reductions that only work one dimension at a time: TP gathers that mix
    pipeline stages or DP replicas (the groups must be Megatron's, not the world), and
    DP sums placed after the TP gather. Four processes: TP=2 x PP=2 and TP=2 x DP=2."""
    ref = torch.load(four_rank_run / f"{case}-ref.pt")
    ranks = [torch.load(four_rank_run / f"{case}-{layout}-rank{r}.pt") for r in range(4)]
    for agg, expected in ref.items():
        for rank, got in enumerate(ranks):
            assert_scores_close(got[agg]["scores"], expected["scores"], f"{case} {layout} {agg} rank{rank}")
        for name in expected["scores"]:
            assert all(torch.equal(r[agg]["scores"][name], ranks[0][agg]["scores"][name]) for r in ranks)
