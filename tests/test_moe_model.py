"""Mixture-of-experts GPTModels (Megatron's MoELayer over SequentialMLP) split over experts: EP=2
must compute what EP=1 computes, over gloo, through Megatron's schedule and DDP."""

from pathlib import Path

import pytest
import torch

from minitron_megatron.model import padded_vocab_size, parameter_count
from tests.dist_utils import run_distributed
from tests.model_utils import small_model

# The compatibility tier (Python 3.12, megatron-core 0.19.2) runs this file too: make test-compat.
pytestmark = pytest.mark.compat

MOE = dict(hidden_size=32, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=48,
           moe_shared_expert_intermediate_size=32, moe_aux_loss_coeff=1e-2)
MBS, MICROBATCHES = 2, 2

# name: (tp, ep, dispatcher, training). World 2: ep2 runs DP=2 (one microbatch per rank), the
# TP layouts DP=1. Megatron's MoELayer refuses to train at TP>1 without sequence parallelism
# (which Megatron's local norms refuse on CPU), so the TP layouts compare the forward in eval mode.
LAYOUTS = {
    "ep2": (1, 2, "allgather", True),
    "ep2_alltoall": (1, 2, "alltoall", True),
    "tp2": (2, 1, "allgather", False),
    "tp2ep2": (2, 2, "allgather", False),
    "tp2ep2_alltoall": (2, 2, "alltoall", False),
}


def _microbatches(cfg):
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(MICROBATCHES):
        tokens = torch.randint(0, cfg.vocab_size, (MBS, cfg.max_position_embeddings + 1), generator=gen)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                        "loss_mask": torch.ones(MBS, cfg.max_position_embeddings),
                        "position_ids": torch.arange(cfg.max_position_embeddings).expand(MBS, -1)})
    return batches


def _global_name(name: str, ctx, num_local: int) -> str:
    """local_experts.<i> -> local_experts.<global expert index>."""
    parts = name.split(".")
    if "local_experts" in parts:
        at = parts.index("local_experts") + 1
        parts[at] = str(ctx.ep_rank * num_local + int(parts[at]))
    return ".".join(parts)


def _gathered(model, ctx, tensor_of) -> dict:
    """{global name: full tensor} of every parameter, on every rank (TP shards and EP experts joined)."""
    import torch.distributed as dist

    from minitron_megatron.model.modules import is_routed_expert_param
    from tests.model_utils import gather_tp

    num_local = MOE["num_moe_experts"] // ctx.ep_size
    # Experts are whole on every TP rank (expert TP is 1), though Megatron marks them TP-parallel.
    mine = {_global_name(n, ctx, num_local): tensor_of(p).detach().clone() if is_routed_expert_param(n)
            else gather_tp(tensor_of(p), p, ctx.tp_group, ctx.tp_size) for n, p in model.named_parameters()}
    every = [None] * ctx.world_size
    dist.all_gather_object(every, mine)
    return {name: t for rank_params in every for name, t in rank_params.items()}


def _loss_and_grads(ctx, dispatcher: str, training: bool) -> dict:
    """Loss (and DDP-reduced gradients when training) of one global batch of 2 microbatches."""
    from megatron.core.distributed import finalize_model_grads

    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model, count_model_parameters
    from minitron_megatron.train.optimizer import wrap_ddp
    from minitron_megatron.train.step import lm_forward_step, reported_means, run_schedule

    cfg = small_model(**MOE)
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    parallel = ParallelConfig(tp=ctx.tp_size, ep=ctx.ep_size, moe_token_dispatcher_type=dispatcher)
    model = build_gpt_model(cfg, ctx, parallel, padded)
    ddp = wrap_ddp(model, model.config)
    ddp.train(training)
    mine = _microbatches(cfg)[ctx.dp_rank::ctx.dp_size]  # DP rank r takes microbatches r, r + dp, ...
    outputs = run_schedule(lm_forward_step(ctx.device), iter(mine), [ddp], len(mine), MBS, cfg.max_position_embeddings,
                           forward_only=not training)
    out = {"loss": reported_means(outputs, {"lm loss": "loss"}, ctx)["loss"],
           "weights": _gathered(model, ctx, lambda p: p.data), "params": count_model_parameters(model, ctx)}
    if training:
        finalize_model_grads([ddp])  # DP all-reduce; experts over their own (expert-DP) replicas
        out["grads"] = _gathered(model, ctx, lambda p: p.main_grad)
    return out


def reference_worker(rank, world, out_dir):
    from minitron_megatron.runtime import init_runtime

    results = {}
    for mode in ("train", "eval"):
        ctx = init_runtime(tp=1, pp=1, ep=1, device="cpu", seed=7)  # the same weights for both
        results[mode] = _loss_and_grads(ctx, "allgather", training=mode == "train")
    torch.save(results, Path(out_dir) / "ref.pt")


def parallel_worker(rank, world, out_dir, layouts):
    from minitron_megatron.runtime import init_runtime

    for layout in layouts:
        tp, ep, dispatcher, training = LAYOUTS[layout]
        ctx = init_runtime(tp=tp, pp=1, ep=ep, device="cpu", seed=7)
        result = _loss_and_grads(ctx, dispatcher, training)
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{layout}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_model")
    run_distributed(reference_worker, 1, str(out))
    run_distributed(parallel_worker, 2, str(out), list(LAYOUTS))
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_expert_parallel_matches_single_rank(runs, layout):
    """Catches experts that depend on the EP size (CPU init drawing rank 1's experts as copies of
    rank 0's, a local expert index taken for a global one), tokens dispatched to the wrong EP rank
    or combined twice (allgather / alltoall over gloo), expert gradients reduced over the wrong
    replicas or scaled twice by Megatron's DDP, the aux loss lost at EP>1, and a parameter count
    that counts each EP rank's experts once per DP rank or not at all."""
    tp, ep, dispatcher, training = LAYOUTS[layout]
    ref = torch.load(runs / "ref.pt")["train" if training else "eval"]
    got = torch.load(runs / f"{layout}.pt")
    cfg = small_model(**MOE)
    expected = parameter_count(cfg, padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1))
    assert ref["params"] == got["params"] == expected == sum(w.numel() for w in ref["weights"].values())
    assert sorted(got["weights"]) == sorted(ref["weights"])
    for name, weight in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=0)
    for name, grad in ref.get("grads", {}).items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_experts_are_distinct(runs):
    """Catches Megatron's CPU initialisation drawing every expert from one generator state: each
    expert must have its own weights (rank 1's would otherwise repeat rank 0's at EP=2)."""
    weights = torch.load(runs / "ref.pt")["train"]["weights"]
    fc1 = [weights[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"]
           for e in range(MOE["num_moe_experts"])]
    assert all(not torch.equal(fc1[0], w) for w in fc1[1:])
