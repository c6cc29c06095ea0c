"""A core attention for Megatron's local spec that calls torch's `scaled_dot_product_attention`.

Megatron's own local core attention, `DotProductAttention`, materialises the [b, np/tp, sq, sk]
score and probability tensors (float32 softmax; the pip megatron-core has no fused softmax
kernels): O(seq^2) memory, about 1.5 GB per layer per microbatch at 8k tokens. torch's SDPA
dispatches to the flash or memory-efficient kernels on GPU (O(seq) memory) and to its CPU
kernels on the host, and computes the same function. This module has DotProductAttention's
constructor and forward signatures, so Megatron's spec system builds it in its place
(`with_sdpa_core_attention`); it has no parameters, so checkpoints are the same either way.
What DotProductAttention does that this does not (context parallelism, packed sequences,
sliding windows, softmax offsets, an attention bias) is refused, not approximated.
"""

import contextlib
import math
from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F


class SDPAttention(torch.nn.Module):
    """DotProductAttention's function through `F.scaled_dot_product_attention`.

    Inputs as Megatron's SelfAttention gives them: query [sq, b, np/tp, hn], key and value
    [sk, b, ng/tp, hn]; output [sq, b, hp] with hp = np/tp * hn.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        from megatron.core.transformer.utils import is_layer_window_attention
        from megatron.core.utils import divide

        super().__init__()
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        problems = _unsupported(config, is_layer_window_attention(
            window_size=config.window_size, window_attn_skip_freq=config.window_attn_skip_freq,
            layer_number=layer_number))
        if problems:
            raise NotImplementedError(f"SDPAttention (model.transformer_impl=sdpa) does not support "
                                      f"{', '.join(problems)}; use model.transformer_impl=transformer_engine")
        tp_size = _tp_size(pg_collection)
        # As DotProductAttention: heads and query groups split evenly over TP.
        self.num_attention_heads_per_partition = divide(numerator=config.num_attention_heads, denominator=tp_size)
        self.num_query_groups_per_partition = divide(numerator=config.num_query_groups, denominator=tp_size)
        self.hidden_size_per_partition = divide(
            numerator=config.kv_channels * config.num_attention_heads, denominator=tp_size)
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        # DotProductAttention divides its score scale by layer_number and multiplies the scores
        # back inside its (float32) softmax: the function is the undivided scale.
        self.scale = self.softmax_scale
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from megatron.core import tensor_parallel
        from megatron.core.transformer.enums import AttnMaskType

        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention (model.transformer_impl=sdpa) does not support packed sequences "
                                      "or an attention bias; use model.transformer_impl=transformer_engine")
        sq, sk = query.size(0), key.size(0)
        # As DotProductAttention's softmax: a given mask wins (True = masked out); else the
        # constructor's mask type (the forward's is unused there too); one query row needs none.
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask.bool()
        elif self.attn_mask_type == AttnMaskType.causal and sq > 1:
            if sq != sk:
                raise NotImplementedError(f"causal attention needs as many queries as keys (got {sq} and {sk})")
            causal = True
        # [sk, b, ng/tp, hn] -> [sk, b, np/tp, hn]: every SDPA backend takes equal head counts
        # (the memory-efficient one has no GQA); a copy of O(seq) size, not O(seq^2).
        repeats = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeats > 1:
            key = key.repeat_interleave(repeats, dim=2)
            value = value.repeat_interleave(repeats, dim=2)
        # [s, b, heads, hn] -> [b, heads, s, hn], SDPA's layout
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        # As DotProductAttention: dropout draws from the model-parallel RNG (different per TP
        # rank) unless sequence parallelism already makes the inputs rank-specific.
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                     is_causal=causal, scale=self.scale)
        # [b, np/tp, sq, hn] -> [sq, b, np/tp * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, query.size(1), self.hidden_size_per_partition)


def _tp_size(pg_collection) -> int:
    if pg_collection is None:  # as DotProductAttention: Megatron's global groups
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_world_size()
    return pg_collection.tp.size()


def _unsupported(config, window: bool) -> list:
    problems = []
    if config.context_parallel_size > 1:
        problems.append(f"context parallelism (context_parallel_size={config.context_parallel_size})")
    if window:
        problems.append(f"sliding-window attention (window_size={config.window_size})")
    if getattr(config, "softmax_type", "vanilla") != "vanilla":
        problems.append(f"softmax_type={config.softmax_type!r}")
    return problems


def with_sdpa_core_attention(layer_spec):
    """Megatron's local layer spec (dense or MoE) with SDPAttention as self-attention's core attention."""
    layer = layer_spec.submodules
    attention = layer.self_attention
    attention = replace(attention, submodules=replace(attention.submodules, core_attention=SDPAttention))
    return replace(layer_spec, submodules=replace(layer, self_attention=attention))
