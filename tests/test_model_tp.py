"""Tensor parallelism of the GPTModel we build: TP=2 must compute what TP=1 computes."""

import pytest
import torch

from minitron_megatron.model import padded_vocab_size, parameter_count
from tests.dist_utils import run_distributed
from tests.model_utils import gather_tp, small_model

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.compat


def _loss_and_grads(rank, world, model_kwargs, out_path):
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model, count_model_parameters, padded_vocab_size
    from minitron_megatron.runtime import init_runtime

    ctx = init_runtime(tp=world, pp=1, device="cpu", seed=7)
    cfg = small_model(**model_kwargs)
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    model = build_gpt_model(cfg, ctx, ParallelConfig(tp=world), padded)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.max_position_embeddings), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (3, cfg.max_position_embeddings), generator=gen)
    position_ids = torch.arange(cfg.max_position_embeddings).expand(3, -1)
    loss = model(tokens, position_ids, None, labels=labels).mean()  # [b, s] -> scalar
    loss.backward()
    grads = {n: gather_tp(p.grad, p, ctx.tp_group, ctx.tp_size) for n, p in model.named_parameters()}
    weights = {n: gather_tp(p.data, p, ctx.tp_group, ctx.tp_size) for n, p in model.named_parameters()}
    params = count_model_parameters(model, ctx)
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads, "weights": weights, "params": params}, out_path)


CASES = {
    "gqa_swiglu_rmsnorm": {},
    "mha_gelu_layernorm_bias_tied": dict(num_query_groups=None, gated_linear_unit=False, activation="gelu",
                                         normalization="LayerNorm", add_bias_linear=True,
                                         share_embeddings_and_output_weights=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tp2_matches_tp1(tmp_path, case):
    """Catches wrong QKV/GLU shard layouts, a missing TP reduction or TP-dependent init:
    loss and every (gathered) gradient at TP=2 must equal TP=1 from the same weights.
    Also catches a parameter count that double-counts replicated norms at TP>1."""
    run_distributed(_loss_and_grads, 1, CASES[case], str(tmp_path / "tp1.pt"))
    run_distributed(_loss_and_grads, 2, CASES[case], str(tmp_path / "tp2.pt"))
    ref, got = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    cfg = small_model(**CASES[case])
    expected = parameter_count(cfg, padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1))
    assert ref["params"] == got["params"] == expected == sum(w.numel() for w in ref["weights"].values())
    assert set(ref["grads"]) == set(got["grads"])
    for name in ref["weights"]:
        torch.testing.assert_close(got["weights"][name], ref["weights"][name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    for name in ref["grads"]:
        torch.testing.assert_close(got["grads"][name], ref["grads"][name], rtol=1e-5, atol=1e-6, msg=name)
