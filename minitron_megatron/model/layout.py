"""Prunable axes of Megatron-core's GPTModel: which parameter touches which axis, along which dim.

This is the only module of the trimmer that knows Megatron parameter names and
layouts. Everything else speaks of these prunable axes:

- hidden channels: replicated over TP (norms, embedding columns, every linear's h side);
- query groups (units of the attention axes): `linear_qkv` rows, `linear_proj` columns;
- heads within a group: rows/columns inside one group's block;
- FFN neurons (units of the MLP axes): `linear_fc1` rows (both GLU halves), `linear_fc2` columns;
- in a MoE layer: routed experts (router rows, whole experts on their EP rank), each routed
  expert's FFN neurons, and the shared expert's neurons (split over TP like a dense MLP).

Layout facts (megatron/core/transformer/attention.py, mlp.py, tensor_parallel/layers.py):
- QKV rows are interleaved per query group, `[q_1 .. q_n, k, v]` x head_dim each, and whole
  groups are split across TP ranks: rank r holds groups [r*G/tp, (r+1)*G/tp).
- `linear_proj` (row parallel) columns are the concatenated query heads, grouped the same way.
- GLU `linear_fc1` has partition_stride 2: rank r holds `[gate_r; up_r]`, not a contiguous
  slice of the TP=1 `[gate; up]`.
- Embedding and output layer are vocab-parallel (dim 0); only their hidden dim (1) is pruned.
- Transformer Engine's spec fuses the input norms into the linears (`layer_norm_weight`).
The TP dim and stride are read from each parameter's `partition_dim` / `partition_stride`.
"""

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from minitron_megatron.config.model import ModelConfig

AXIS_QKV = "qkv"
"""Column-parallel rows; units = query groups of (heads_per_group + 2) * head_dim rows."""
AXIS_PROJ = "proj"
"""Row-parallel columns; units = query groups of heads_per_group * head_dim columns."""
AXIS_FC1 = "fc1"
"""Column-parallel rows; units = neurons (one row per GLU half)."""
AXIS_FC2 = "fc2"
"""Row-parallel columns; units = neurons."""
AXIS_SHARED_FC1 = "shared_fc1"
"""A MoE layer's shared expert: a dense MLP split over TP like `mlp`, with its own width."""
AXIS_SHARED_FC2 = "shared_fc2"
AXIS_EXPERT_FC1 = "expert_fc1"
"""A routed expert's fc1 rows (both GLU halves of a neuron together). Experts are whole on their
EP rank (expert TP is 1): the axis is never split over TP, although Megatron marks the weight
tensor-parallel (partition_dim/stride describe its layout)."""
AXIS_EXPERT_FC2 = "expert_fc2"
ATTENTION_AXES = (AXIS_QKV, AXIS_PROJ)
MLP_AXES = (AXIS_FC1, AXIS_FC2)
SHARED_AXES = (AXIS_SHARED_FC1, AXIS_SHARED_FC2)
EXPERT_AXES = (AXIS_EXPERT_FC1, AXIS_EXPERT_FC2)

_LAYER_PREFIX = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ParamLayout:
    """How one parameter is trimmed."""

    hidden_dim: Optional[int]
    """The dim indexed by hidden channels (None: the parameter has no hidden dim)."""
    unit_axis: Optional[str]
    """AXIS_* when the parameter is TP-sharded along a prunable unit axis."""
    tp_dim: Optional[int] = None
    """partition_dim of a TP-sharded parameter (vocab-parallel ones included)."""
    stride: int = 1
    """partition_stride (2 for GLU fc1)."""
    expert_dim: Optional[int] = None
    """The dim indexed by routed experts (a MoE router's rows); never TP-split."""


# (suffix regex, hidden dim, unit axis); the first match wins (q/k norms before other norms).
_RULES: List[Tuple[str, Optional[int], Optional[str]]] = [
    (r"self_attention\.(q|k)_layernorm\.(weight|bias)", None, None),  # [d]: head dim is kept
    (r"embedding\.word_embeddings\.weight", 1, None),           # [V/tp, h]
    (r"embedding\.position_embeddings\.weight", 1, None),       # [s, h]
    (r"output_layer\.weight", 1, None),                         # [V/tp, h]
    (r".*(layernorm|layer_norm)\.(weight|bias)", 0, None),      # [h]
    (r".*\.layer_norm_(weight|bias)", 0, None),                 # TE fused norm: [h]
    (r"self_attention\.linear_qkv\.weight", 1, AXIS_QKV),       # [G/tp*(n+2)*d, h]
    (r"self_attention\.linear_qkv\.bias", None, AXIS_QKV),      # [G/tp*(n+2)*d]
    (r"self_attention\.linear_proj\.weight", 0, AXIS_PROJ),     # [h, G/tp*n*d]
    (r"self_attention\.linear_proj\.bias", 0, None),            # [h]
    (r"mlp\.linear_fc1\.weight", 1, AXIS_FC1),                  # [2*ffn/tp, h] as [gate_r; up_r]
    (r"mlp\.linear_fc1\.bias", None, AXIS_FC1),                 # [2*ffn/tp]
    (r"mlp\.linear_fc2\.weight", 0, AXIS_FC2),                  # [h, ffn/tp]
    (r"mlp\.linear_fc2\.bias", 0, None),                        # [h]
    # A MoE layer (Megatron's MoELayer over SequentialMLP; see `_EXPERT` for routed experts):
    (r"mlp\.shared_experts\.linear_fc1\.weight", 1, AXIS_SHARED_FC1),  # [2*shared/tp, h]
    (r"mlp\.shared_experts\.linear_fc1\.bias", None, AXIS_SHARED_FC1),
    (r"mlp\.shared_experts\.linear_fc2\.weight", 0, AXIS_SHARED_FC2),  # [h, shared/tp]
    (r"mlp\.shared_experts\.linear_fc2\.bias", 0, None),               # [h]
    (r"mlp\.shared_experts\.gate_weight", 1, None),                     # [1, h]
]
# Routed-expert parameters, after `_EXPERT` stripped `mlp.experts.local_experts.<i>.`: whole on
# their EP rank ([2*F, h] fc1 as [gate; up], [h, F] fc2).
_EXPERT_RULES: List[Tuple[str, Optional[int], Optional[str]]] = [
    (r"linear_fc1\.weight", 1, AXIS_EXPERT_FC1),
    (r"linear_fc1\.bias", None, AXIS_EXPERT_FC1),
    (r"linear_fc2\.weight", 0, AXIS_EXPERT_FC2),
    (r"linear_fc2\.bias", 0, None),
]
_ROUTER = re.compile(r"^mlp\.router\.(weight|bias)$")  # [E, h], [E]: replicated everywhere
_COMPILED = [(re.compile(rf"^(?:.*\.)?{pattern}$"), hdim, axis) for pattern, hdim, axis in _RULES]
_EXPERT_COMPILED = [(re.compile(rf"^{pattern}$"), hdim, axis) for pattern, hdim, axis in _EXPERT_RULES]


def param_layout(name: str, param: torch.Tensor) -> ParamLayout:
    """The trimming layout of parameter `name`; unknown parameters are an error, never skipped."""
    in_layer = split_layer_name(name)
    suffix = in_layer[1] if in_layer else name
    router = _ROUTER.match(suffix)
    if router:
        return ParamLayout(1 if router.group(1) == "weight" else None, None, expert_dim=0)
    expert = _EXPERT.match(suffix)
    rules = _EXPERT_COMPILED if expert else _COMPILED
    suffix = expert.group(2) if expert else suffix
    for pattern, hidden_dim, axis in rules:
        if pattern.match(suffix):
            if axis is not None and not getattr(param, "tensor_model_parallel", False):
                raise ValueError(f"{name} should be tensor-parallel (partition_dim set) but is not")
            tp_dim = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
            return ParamLayout(hidden_dim, axis, tp_dim, int(getattr(param, "partition_stride", 1)))
    raise ValueError(f"the trimmer does not know how to prune parameter {name!r} {tuple(param.shape)}")


_NORM_PARAMS = [
    (re.compile(r"^(input_layernorm|self_attention\.linear_qkv\.layer_norm)\.?_?(weight|bias)$"), 0),
    (re.compile(r"^(pre_mlp_layernorm|mlp\.linear_fc1\.layer_norm)\.?_?(weight|bias)$"), 1),
]


def norm_param(name: str, num_layers: int) -> Optional[Tuple[int, str]]:
    """(norm row, 'weight' or 'bias') of a hidden-channel norm parameter, else None.

    Rows follow trim/hidden.py: 2i = layer i's input norm (or TE's fused qkv norm), 2i+1 its
    pre-MLP norm (fused fc1 norm), 2L the final norm. `name` is a full model parameter name.
    """
    in_layer = split_layer_name(name)
    if in_layer is None:
        match = re.match(r"^(?:.*\.)?decoder\.final_layernorm\.(weight|bias)$", name)
        return (2 * num_layers, match.group(1)) if match else None
    index, suffix = in_layer
    for pattern, offset in _NORM_PARAMS:
        match = pattern.match(suffix)
        if match:
            return 2 * index + offset, match.group(2)
    return None


def split_layer_name(name: str) -> Optional[Tuple[int, str]]:
    """'decoder.layers.3.mlp.linear_fc1.weight' -> (3, 'mlp.linear_fc1.weight'); None off-layer."""
    match = _LAYER_PREFIX.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def decoder_layers(model) -> List[torch.nn.Module]:
    """This stage's transformer layers, in local order."""
    return list(model.decoder.layers)


def global_layer_index(layer: torch.nn.Module) -> int:
    """0-based global index of a layer (Megatron numbers layers from 1 across all stages)."""
    return layer.layer_number - 1


def non_layer_parameters(model) -> List[Tuple[str, torch.nn.Parameter]]:
    """Embeddings, final norm and output layer of this stage (whatever it holds)."""
    return [(n, p) for n, p in model.named_parameters() if split_layer_name(n) is None]


# ---- index arithmetic inside one query group --------------------------------------------------

def qkv_rows_in_group(kept_slots: List[int], heads_per_group: int, head_dim: int) -> List[int]:
    """Rows of one group's QKV block `[q_1..q_n, k, v]` that survive: kept query slots, K and V."""
    slots = list(kept_slots) + [heads_per_group, heads_per_group + 1]  # K and V follow the queries
    return [slot * head_dim + e for slot in slots for e in range(head_dim)]


def proj_cols_in_group(kept_slots: List[int], head_dim: int) -> List[int]:
    """Columns of one group's block of `linear_proj` that survive (the kept query heads)."""
    return [slot * head_dim + e for slot in kept_slots for e in range(head_dim)]


def query_rows(slot: int, head_dim: int) -> slice:
    """Rows of query slot `slot` inside one group's QKV block (and its columns in proj)."""
    return slice(slot * head_dim, (slot + 1) * head_dim)


def expert_of(name: str) -> Optional[Tuple[int, str]]:
    """'mlp.experts.local_experts.3.linear_fc1.weight' (a layer's parameter) -> (3, 'linear_fc1.weight')."""
    match = _EXPERT.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def expert_param_name(local: int, suffix: str) -> str:
    return f"mlp.experts.local_experts.{local}.{suffix}"


def unit_size(axis: str, cfg: ModelConfig) -> int:
    """Rows (along the TP dim, per stride half) of one unit of `axis` in the model `cfg`."""
    cfg = cfg.resolved()
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    if axis not in ATTENTION_AXES:
        return 1  # neurons, dense, shared or routed
    return {AXIS_QKV: (per_group + 2) * cfg.kv_channels, AXIS_PROJ: per_group * cfg.kv_channels}[axis]


def num_units(axis: str, cfg: ModelConfig) -> int:
    """Global units of `axis`: query groups for attention, neurons for an MLP (per routed expert)."""
    cfg = cfg.resolved()
    if axis in SHARED_AXES:
        return cfg.moe_shared_expert_intermediate_size
    if axis in EXPERT_AXES:
        return cfg.moe_ffn_hidden_size
    return cfg.num_query_groups if axis in ATTENTION_AXES else cfg.ffn_hidden_size


# ---- a model to copy trimmed shards into ------------------------------------------------------
