"""BF16 trimming across pipeline stages (2 real gloo processes).

A bf16 model is bf16 throughout, norms included (`build_gpt_model` casts it as Megatron-LM's
Float16Module does; Megatron's torch norms are built float32), and a layer moved between
stages travels in one buffer per dtype. One launch: PP=1 (each rank a DP replica) trims and
records the reference, then the same processes re-initialise at PP=2, load the same weights
and trim with the same plan.
"""

from dataclasses import replace

import torch

from tests.dist_utils import run_distributed
from tests.trim.cases import GQA, PADDED, batches, synthetic_scores

BF16 = replace(GQA, params_dtype="bfloat16")
"""4 layers, h64, 8 heads / 4 groups, SwiGLU: tiny, because these CPUs emulate bf16."""


def _plan():
    from minitron_megatron.config.prune import TrimTarget
    from minitron_megatron.trim import plan_from_scores, validate_target

    # Old stages hold layers [0, 1] [2, 3]; dropping 0 and 1 moves old layer 2 from stage 1
    # to stage 0 (new layer 0). Width trims too, so the moved tensors are sliced ones.
    target = TrimTarget(hidden_size=48, num_query_groups=2, ffn_hidden_size=96, drop_layers=[0, 1])
    new_cfg = validate_target(BF16, target, 1, 2, None, PADDED)
    return plan_from_scores(BF16, new_cfg, synthetic_scores(BF16, seed=5), drop_layers=target.drop_layers)


def _by_global_name(model):
    """{name with the global layer index: parameter} of this stage."""
    from minitron_megatron.model.layout import split_layer_name

    out = {}
    for name, p in model.named_parameters():
        if split_layer_name(name):
            local, suffix = split_layer_name(name)
            name = f"decoder.layers.{model.decoder.layers[local].layer_number - 1}.{suffix}"
        out[name] = p
    return out


def _global_params(model):
    return {name: p.detach().clone() for name, p in _by_global_name(model).items()}


def _load_global(model, weights) -> None:
    with torch.no_grad():
        for name, p in _by_global_name(model).items():
            p.copy_(weights[name])


def _pipeline_logits(model, ctx):
    """Logits [b, s, V] on the last stage; stage 0 sends its hidden states [s, b, h] over."""
    import torch.distributed as dist

    batch = batches(BF16, num=1)[0]
    ranks = dist.get_process_group_ranks(ctx.pp_group) if ctx.pp_size > 1 else [ctx.rank]
    with torch.no_grad():
        if not ctx.is_first_stage:
            hidden = torch.empty(BF16.max_position_embeddings, 2, model.config.hidden_size, dtype=torch.bfloat16)
            dist.recv(hidden, ranks[ctx.pp_rank - 1])
            model.set_input_tensor(hidden)
        out = model(batch["tokens"], batch["position_ids"], None)
        if not ctx.is_last_stage:
            dist.send(out.contiguous(), ranks[ctx.pp_rank + 1])
            return None
        return out


def _worker(rank, world, out_dir):
    from minitron_megatron.config.parallel import ParallelConfig
    from minitron_megatron.model import build_gpt_model
    from minitron_megatron.runtime import destroy_runtime, init_runtime
    from minitron_megatron.trim import apply_plan

    plan = _plan()
    ctx = init_runtime(tp=1, pp=1, device="cpu", seed=7)  # DP=2: a full replica per rank
    torch.manual_seed(11)
    model = build_gpt_model(BF16, ctx, ParallelConfig(), PADDED)
    source = _global_params(model)
    ref = apply_plan(model, plan, BF16, ctx, ParallelConfig(), PADDED).model
    ref_weights, ref_logits = _global_params(ref), _pipeline_logits(ref, ctx)

    ctx = init_runtime(tp=1, pp=2, device="cpu", seed=7)
    parallel = ParallelConfig(pp=2)
    model = build_gpt_model(BF16, ctx, parallel, PADDED, init="none")
    _load_global(model, source)
    trimmed = apply_plan(model, plan, BF16, ctx, parallel, PADDED).model
    torch.save({"weights": _global_params(trimmed), "logits": _pipeline_logits(trimmed, ctx),
                "ref_weights": ref_weights, "ref_logits": ref_logits}, f"{out_dir}/stage{ctx.pp_rank}.pt")
    destroy_runtime()


def test_bf16_trim_moves_layers_between_stages(tmp_path):
    """Catches a moved layer's tensors promoted, mis-split or rejected on the way (its norms and
    linears once had two dtypes), or a trimmed bf16 model with float32 norms (which Megatron's
    Float16Optimizer cannot checkpoint): PP=2 weights equal PP=1's exactly, all bf16, and the
    logits agree within bf16 tolerance."""
    run_distributed(_worker, 2, str(tmp_path))
    stages = [torch.load(tmp_path / f"stage{s}.pt") for s in range(2)]
    ref_weights, ref_logits = stages[0]["ref_weights"], stages[0]["ref_logits"]
    weights = {**stages[0]["weights"], **stages[1]["weights"]}
    assert sorted(weights) == sorted(ref_weights)
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    for name, w in weights.items():
        assert w.dtype == ref_weights[name].dtype and torch.equal(w, ref_weights[name]), name
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in stages[0]["weights"]  # the moved layer
    logits = stages[1]["logits"]
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=1.6e-2, atol=1e-2)
