"""Importance of a mixture-of-experts GPTModel: per expert, per expert-FFN neuron, routing
frequency, shared-expert neurons, and the dense scores, equal to a float64 reference at TP=1/EP=1
and unchanged when the model is split over experts, tensors, pipeline stages or data."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.importance import moe_workers
from tests.importance.test_parallel import assert_scores_close

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = [pytest.mark.compat, pytest.mark.slow]

MOE_KEYS = {"moe.expert", "moe.expert_frequency", "moe.expert_neuron", "moe.neuron", "moe.shared_neuron"}


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_importance")
    run_distributed(moe_workers.reference_worker, 1, str(out))
    run_distributed(moe_workers.parallel_worker, 2, str(out), list(moe_workers.LAYOUTS))
    return out


def test_single_rank_matches_float64_reference(moe_runs):
    """Catches a wrong definition: an expert's output norm averaged over all tokens instead of
    the tokens routed to it, routing counts taken after dispatch (duplicated tokens), expert
    neurons read from the wrong expert (local vs global order) or aggregated per microbatch,
    the pooled neuron score weighting experts instead of routed tokens, shared-expert neurons
    mixed with routed ones; and the dense scores (heads, channels, BI) still right in MoE layers.
    The reference hooks each expert's own MLP module, not Megatron's concatenated output."""
    got, expected = torch.load(moe_runs / "moe-ref.pt"), torch.load(moe_runs / "moe-f64.pt")
    for agg, ref in expected.items():
        scores = got[agg]["scores"]
        assert MOE_KEYS <= set(scores) and "mlp.neuron" not in scores
        assert_scores_close({k: scores[k] for k in ref}, ref, f"f64 {agg}")
        frequency = scores["moe.expert_frequency"]
        torch.testing.assert_close(frequency.sum(-1), torch.full((2,), 2.0))  # top-2 routing
        assert (scores["moe.expert"] > 0).all(), "every expert got tokens: no empty-expert zeros hide bugs"
    assert got[("mean", "l2")]["meta"]["moe"]["expert"].startswith("per expert: mean over the tokens routed")


@pytest.mark.parametrize("layout", sorted(moe_workers.LAYOUTS))
def test_split_matches_unsplit(moe_runs, layout):
    """Catches expert statistics summed over the wrong ranks: experts of one EP rank counted
    as another's, or normalised per rank before the sum over the EP ranks' different data
    (ep2, alltoall dispatcher), tokens counted once per TP rank (tp2: without sequence
    parallelism every TP rank routes the same tokens), the allgather dispatcher's duplicated
    tokens leaking into counts (tp2ep2), MoE layers written at local indices (pp2) -- against
    the float64 reference for every (seq, batch) aggregation, every rank holding the same bits."""
    ref = torch.load(moe_runs / "moe-ref.pt")
    expected = torch.load(moe_runs / "moe-f64.pt")
    ranks = [torch.load(moe_runs / f"moe-{layout}-rank{r}.pt") for r in range(2)]
    for agg in expected:
        for rank, got in enumerate(ranks):
            scores = got[agg]["scores"]
            assert_scores_close(scores, ref[agg]["scores"], f"{layout} {agg} rank{rank}")
            assert_scores_close({k: scores[k] for k in expected[agg]}, expected[agg], f"{layout} f64 {agg}")
            assert got[agg]["meta"]["calibration"] == ref[agg]["meta"]["calibration"]
        for name, tensor in ranks[0][agg]["scores"].items():
            assert torch.equal(tensor, ranks[1][agg]["scores"][name]), (layout, agg, name)
