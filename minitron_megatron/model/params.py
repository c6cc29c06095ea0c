"""Exact parameter counts of the global (unsharded) model, from its config alone."""

from typing import Dict, Optional

import torch
import torch.distributed as dist

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.runtime.context import ParallelContext


def _norm_params(cfg: ModelConfig) -> int:
    # LayerNorm has a bias; RMSNorm only a scale.
    return cfg.hidden_size * (2 if cfg.normalization == "LayerNorm" else 1)


def _mlp_params(cfg: ModelConfig, ffn: int) -> Dict[str, int]:
    """linear_fc1 ([gate; up] with GLU) and linear_fc2 of one MLP of width `ffn`."""
    h, bias = cfg.hidden_size, cfg.add_bias_linear
    fc1_out = ffn * (2 if cfg.gated_linear_unit else 1)
    return {"fc1": h * fc1_out + (fc1_out if bias else 0), "fc2": ffn * h + (h if bias else 0)}


def _moe_params(cfg: ModelConfig, active: bool = False) -> Dict[str, int]:
    """Router, the routed experts (all of them, or the top-k one token uses when `active`), and
    the shared expert (with its gate) of one MoE layer. The router scores every expert for every
    token, so all its rows are active."""
    h, experts = cfg.hidden_size, cfg.num_moe_experts
    used = cfg.moe_router_topk if active else experts
    parts = {"router": experts * h + (experts if cfg.add_bias_linear else 0),
             "experts": used * sum(_mlp_params(cfg, cfg.moe_ffn_hidden_size).values())}
    if cfg.moe_shared_expert_intermediate_size is not None:
        parts["shared_expert"] = sum(_mlp_params(cfg, cfg.moe_shared_expert_intermediate_size).values()) \
            + (h if cfg.moe_shared_expert_gate else 0)
    return parts


def layer_parameter_count(cfg: ModelConfig, active: bool = False) -> Dict[str, int]:
    """Parameters of one transformer layer, by part (an MoE layer: router, experts, shared_expert);
    `active`: only those one token uses (top-k of the routed experts)."""
    cfg = cfg.resolved()
    h, d = cfg.hidden_size, cfg.kv_channels
    q_width = cfg.num_attention_heads * d
    qkv_out = q_width + 2 * cfg.num_query_groups * d
    qkv_bias = qkv_out if (cfg.add_qkv_bias or cfg.add_bias_linear) else 0
    bias = cfg.add_bias_linear
    return {
        "input_norm": _norm_params(cfg),
        "qkv": h * qkv_out + qkv_bias + (2 * d * _norm_params(cfg) // h if cfg.qk_layernorm else 0),  # + q/k norms
        "proj": q_width * h + (h if bias else 0),
        "pre_mlp_norm": _norm_params(cfg),
        **(_moe_params(cfg, active) if cfg.is_moe else _mlp_params(cfg, cfg.ffn_hidden_size)),
    }


def parameter_count(cfg: ModelConfig, padded_vocab: Optional[int] = None, active: bool = False) -> int:
    """Exact global parameter count; `padded_vocab` defaults to the true vocab size. `active`:
    the parameters one token uses (see `active_parameter_count`)."""
    cfg = cfg.resolved()
    vocab = padded_vocab or cfg.vocab_size
    embedding = vocab * cfg.hidden_size
    if cfg.position_embedding_type == "learned_absolute":
        embedding += cfg.max_position_embeddings * cfg.hidden_size
    output = 0 if cfg.share_embeddings_and_output_weights else vocab * cfg.hidden_size
    layers = cfg.num_layers * sum(layer_parameter_count(cfg, active).values())
    return embedding + layers + _norm_params(cfg) + output


def active_parameter_count(cfg: ModelConfig, padded_vocab: Optional[int] = None) -> int:
    """Exact parameters used per token: every parameter except the routed experts a token is not
    sent to (each MoE layer runs `moe_router_topk` of its `num_moe_experts`); the whole model for
    a dense one. The embedding counts whole, as in the total (the usual convention)."""
    return parameter_count(cfg, padded_vocab, active=True)


def count_model_parameters(model: torch.nn.Module, ctx: ParallelContext) -> int:
    """Global parameter count of a sharded model, by summing shards across ranks.

    TP-replicated parameters (norms, biases of row-parallel layers) are counted once
    by counting them only on TP rank 0; a tied output layer on the last stage shares
    the embedding and is skipped there. Each model replica is counted once: DP rank 0's,
    except routed experts, which EP spreads over DP ranks: each expert counts on the first
    of its replicas (expert-DP rank 0; experts are whole, never TP-split).
    """
    from minitron_megatron.model.modules import is_routed_expert_param

    local = 0
    for name, param in model.named_parameters():
        if getattr(param, "shared_embedding", False) and not ctx.is_first_stage:
            continue  # the last stage's copy of a tied word embedding
        if is_routed_expert_param(name):
            local += param.numel() if ctx.expert_dp_rank == 0 else 0
        elif ctx.dp_rank == 0 and (getattr(param, "tensor_model_parallel", False) or ctx.tp_rank == 0):
            local += param.numel()
    total = torch.tensor([local], dtype=torch.int64, device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(total)
    return int(total.item())
