"""Every rule that ties TP / PP / EP / DP / SP sizes to a model, in one place.

Commands collect these problems together with their own and report them in one
ConfigError before any heavy work: the world size against TP x PP; heads, query
groups, ffn and the padded vocabulary against TP (each TP rank holds whole heads,
whole groups and an equal slice of the rest); experts against EP; layers against PP and
`parallel.pp_layout`; sequence parallelism against TP and the layer spec.
`subject` prefixes the size names in messages ("model." for a model being built,
"the pruned " for a trim target).
"""

from typing import List, Optional, Sequence

TP_DIVIDED = ("num_attention_heads", "num_query_groups", "ffn_hidden_size")


def world_problems(world_size: int, tp: int, pp: int, ep: int = 1) -> List[str]:
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        return [f"parallel.tp={tp} x parallel.pp={pp} must divide the world size {world_size} "
                "(data parallel is world_size / (tp * pp))"]
    if ep < 1 or world_size % (ep * pp):
        # Megatron lays experts out over ep x expert-DP x pp ranks (expert TP is 1).
        return [f"parallel.ep={ep} x parallel.pp={pp} must divide the world size {world_size}; "
                f"allowed parallel.ep: {_divisors(world_size // pp)}"]
    return []


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


DISPATCHERS = ("allgather", "alltoall")
"""Megatron's token dispatchers that run on every backend (its `flex` needs DeepEP on GPUs)."""


def expert_parallel_problems(cfg, parallel, subject: str = "model.") -> List[str]:
    """Sizes that EP must divide, and the TP rule of a MoE model's shared expert (`cfg` resolved)."""
    ep = parallel.ep
    if parallel.moe_token_dispatcher_type not in DISPATCHERS:
        return [f"parallel.moe_token_dispatcher_type={parallel.moe_token_dispatcher_type!r} is not one of "
                f"{list(DISPATCHERS)}"]
    if cfg.num_moe_experts is None:
        return [f"parallel.ep={ep} needs a mixture-of-experts model ({subject}num_moe_experts is not set)"] \
            if ep != 1 else []
    if ep < 1 or cfg.num_moe_experts % ep:
        return [f"parallel.ep={ep} does not divide {subject}num_moe_experts={cfg.num_moe_experts}; "
                f"allowed parallel.ep: {_divisors(cfg.num_moe_experts)}"]
    shared = cfg.moe_shared_expert_intermediate_size
    if shared is not None and shared % parallel.tp:
        # The shared expert is a plain MLP split over the attention TP group.
        return [f"parallel.tp={parallel.tp} does not divide {subject}moe_shared_expert_intermediate_size={shared}"]
    return []


def tensor_parallel_problems(cfg, tp: int, padded_vocab: Optional[int] = None, subject: str = "model.") -> List[str]:
    """Sizes that TP must divide (`cfg`: a resolved ModelConfig)."""
    problems = [f"parallel.tp={tp} does not divide {subject}{name}={getattr(cfg, name)}"
                for name in TP_DIVIDED if getattr(cfg, name) % tp]
    return problems + (vocab_problems(padded_vocab, tp) if padded_vocab is not None else [])


def vocab_problems(padded_vocab: int, tp: int) -> List[str]:
    """The embedding and output layer are split over TP by vocabulary rows."""
    return [f"parallel.tp={tp} does not divide the padded vocab {padded_vocab}"] if padded_vocab % tp else []


def pipeline_problems(num_layers: int, pp: int, layout: Optional[Sequence[int]],
                      subject: str = "model.") -> List[str]:
    """`layout` (layers per stage) or the even split must give every stage a layer."""
    if layout is not None:
        layout = list(layout)
        if len(layout) != pp or sum(layout) != num_layers or min(layout) < 1:
            return [f"parallel.pp_layout={layout} must list {pp} positive layer counts summing to "
                    f"{subject}num_layers={num_layers}"]
        if len(set(layout[1:-1])) > 1:  # Megatron sets first/last stage sizes; the middle split evenly
            return [f"parallel.pp_layout={layout}: the middle stages must hold equal layer counts"]
        return []
    if num_layers < pp:
        return [f"{subject}num_layers={num_layers} is fewer than parallel.pp={pp} pipeline stages"]
    return []


def sequence_parallel_problems(sequence_parallel: bool, tp: int, transformer_impl: str) -> List[str]:
    problems = []
    if sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tp>1")
    # auto may resolve to TE only where it imports (and then only on CUDA: model/build.py checks that)
    te_possible = transformer_impl == "transformer_engine" or (transformer_impl == "auto" and _te_importable())
    if sequence_parallel and not te_possible:
        # Megatron's local spec wraps torch norms, which assert against sequence parallelism.
        problems.append("parallel.sequence_parallel=true needs model.transformer_impl=transformer_engine "
                        "(Megatron's local torch norms do not support it)")
    return problems


def _te_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def moe_training_problems(cfg, parallel) -> List[str]:
    """Megatron's MoELayer raises in training mode at TP>1 without sequence parallelism (scoring
    and evaluation run in eval mode and are not affected)."""
    if cfg.num_moe_experts is None or parallel.tp == 1 or parallel.sequence_parallel:
        return []
    return [f"parallel.tp={parallel.tp} with a mixture-of-experts model trains only with "
            "parallel.sequence_parallel=true (Megatron's MoELayer refuses otherwise), which needs "
            "model.transformer_impl=transformer_engine; on Megatron's local spec use parallel.tp=1 "
            "and parallel.ep to split the experts"]


def model_parallel_problems(cfg, parallel, padded_vocab: Optional[int] = None, subject: str = "model.") -> List[str]:
    """Every reason `cfg` (resolved) cannot be split as `parallel` (a ParallelConfig) asks."""
    return (tensor_parallel_problems(cfg, parallel.tp, padded_vocab, subject)
            + expert_parallel_problems(cfg, parallel, subject)
            + pipeline_problems(cfg.num_layers, parallel.pp, parallel.pp_layout, subject)
            + sequence_parallel_problems(parallel.sequence_parallel, parallel.tp, cfg.transformer_impl))
