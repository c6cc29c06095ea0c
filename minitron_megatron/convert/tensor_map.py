"""Megatron GPTModel parameters <-> Hugging Face tensors, and their TP shards.

Each Megatron parameter is described by a `Source`: how its full (TP=1) tensor is
made of HF tensors. A Source fills any contiguous range of the full tensor along
its TP dim from the HF files, in place (so a rank reads only its slice, into the
parameter's own storage), and splits a full tensor back into HF tensors. Which range a rank holds comes from the parameter's
own `partition_dim` / `partition_stride` (Megatron's attributes), never from names.

Layouts (megatron/core/transformer/attention.py, mlp.py, tensor_parallel/layers.py):
- `linear_qkv` rows are interleaved per query group: `[q_1 .. q_n, k, v]` x head_dim,
  `# [ng*(np/ng+2)*hn, h]`; TP splits whole groups, so a rank's rows are contiguous.
- GLU `linear_fc1` is `[gate; up]` with partition_stride 2: rank r holds
  `[gate_r; up_r]`, `# [2*ffn/tp, h]`.
- embedding / output layer are vocab-parallel over the *padded* vocab
  `# [V_pad/tp, h]`; rows past the HF vocab are zero padding.
- `linear_proj` / `linear_fc2` are row-parallel: TP splits their columns (dim 1).
- A MoE layer (Megatron's MoELayer over SequentialMLP): `mlp.router.weight` `# [E, h]`, replicated;
  routed experts `mlp.experts.local_experts.{i}.linear_fc1/2` are whole on their EP rank (expert
  TP is 1, though Megatron marks them tensor-parallel), local expert i of EP rank r being global
  expert r * E/ep + i, fc1 `[gate; up]` `# [2*F, h]`; the shared expert `mlp.shared_experts.*` is
  split over TP like a dense MLP, its sigmoid gate `gate_weight` `# [1, h]` replicated.
"""

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from minitron_megatron.config.model import ModelConfig
from minitron_megatron.convert.families import MIXTRAL, NEMOTRON, Family
from minitron_megatron.model.layout import expert_of
from minitron_megatron.model.modules import is_routed_expert_param

Reader = Callable[[str, int, int, int], torch.Tensor]
"""read(hf_name, dim, start, stop) -> that slice of the HF tensor (a view of the mapped file:
sources copy it straight into the parameter, so no intermediate copy is ever made)."""


@dataclass(frozen=True)
class Plain:
    """Full tensor == one HF tensor."""

    name: str

    def names(self) -> List[str]:
        return [self.name]

    def read_into(self, read: Reader, dim: int, start: int, stop: int, out: torch.Tensor) -> None:
        out.copy_(read(self.name, dim, start, stop))

    def split(self, full: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {self.name: full}


@dataclass(frozen=True)
class Vocab:
    """Embedding or output rows: the HF vocab, then zero rows up to the padded vocab."""

    name: str
    vocab_size: int

    def names(self) -> List[str]:
        return [self.name]

    def read_into(self, read: Reader, dim: int, start: int, stop: int, out: torch.Tensor) -> None:
        real = max(0, min(stop, self.vocab_size) - start)  # rows of this range inside the HF vocab
        if real:
            out[:real].copy_(read(self.name, 0, start, start + real))  # [rows, h]
        out[real:].zero_()

    def split(self, full: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {self.name: full[: self.vocab_size]}


@dataclass(frozen=True)
class QKV:
    """`[q_1..q_n, k, v]` per query group from HF's separate q, k, v (weights or biases)."""

    q: str
    k: str
    v: str
    heads_per_group: int
    head_dim: int

    def names(self) -> List[str]:
        return [self.q, self.k, self.v]

    def read_into(self, read: Reader, dim: int, start: int, stop: int, out: torch.Tensor) -> None:
        n, d = self.heads_per_group, self.head_dim
        group_rows = (n + 2) * d
        assert dim == 0 and start % group_rows == 0 and stop % group_rows == 0, "TP splits whole query groups"
        g0, g1 = start // group_rows, stop // group_rows
        rest = out.shape[1:]
        groups = out.view(g1 - g0, group_rows, *rest)  # [ng_local, (n+2)*d, (h)]
        groups[:, : n * d].copy_(read(self.q, 0, g0 * n * d, g1 * n * d).reshape(g1 - g0, n * d, *rest))
        groups[:, n * d: (n + 1) * d].copy_(read(self.k, 0, g0 * d, g1 * d).reshape(g1 - g0, d, *rest))
        groups[:, (n + 1) * d:].copy_(read(self.v, 0, g0 * d, g1 * d).reshape(g1 - g0, d, *rest))

    def split(self, full: torch.Tensor) -> Dict[str, torch.Tensor]:
        n, d = self.heads_per_group, self.head_dim
        rest = full.shape[1:]
        grouped = full.reshape(-1, (n + 2) * d, *rest)  # [ng, (n+2)*d, (h)]
        q, k, v = grouped.split([n * d, d, d], dim=1)
        return {self.q: q.reshape(-1, *rest), self.k: k.reshape(-1, *rest), self.v: v.reshape(-1, *rest)}


@dataclass(frozen=True)
class GLU:
    """`[gate; up]` along dim 0 from HF's gate_proj and up_proj."""

    gate: str
    up: str
    ffn: int

    def names(self) -> List[str]:
        return [self.gate, self.up]

    def read_into(self, read: Reader, dim: int, start: int, stop: int, out: torch.Tensor) -> None:
        assert dim == 0
        if start < self.ffn:  # gate rows of this range
            end = min(stop, self.ffn)
            out[: end - start].copy_(read(self.gate, 0, start, end))
        if stop > self.ffn:  # up rows of this range
            begin = max(start, self.ffn)
            out[begin - start:].copy_(read(self.up, 0, begin - self.ffn, stop - self.ffn))

    def split(self, full: torch.Tensor) -> Dict[str, torch.Tensor]:
        gate, up = full.chunk(2, dim=0)
        return {self.gate: gate, self.up: up}


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def source_for(name: str, cfg: ModelConfig, family: Family, layer_offset: int = 0, expert_offset: int = 0):
    """The Source of Megatron parameter `name` (local layer numbers + this stage's `layer_offset`;
    local expert numbers + this EP rank's `expert_offset`)."""
    cfg = cfg.resolved()
    norm = ["weight", "bias"] if family is NEMOTRON else ["weight"]
    if name == "embedding.word_embeddings.weight":
        return Vocab("model.embed_tokens.weight", cfg.vocab_size)
    if name == "output_layer.weight":
        tied = cfg.share_embeddings_and_output_weights
        return Vocab("model.embed_tokens.weight" if tied else "lm_head.weight", cfg.vocab_size)
    if name.startswith("decoder.final_layernorm."):
        return _norm("model.norm.", name.rsplit(".", 1)[1], norm)
    match = _LAYER.match(name)
    if not match:
        raise KeyError(name)
    hf = f"model.layers.{int(match.group(1)) + layer_offset}."
    suffix = match.group(2)
    attn, mlp = hf + "self_attn.", hf + "mlp."
    table = {
        "self_attention.linear_qkv.weight": lambda: _qkv(attn, "weight", cfg),
        "self_attention.linear_qkv.bias": lambda: _qkv(attn, "bias", cfg),
        "self_attention.linear_proj.weight": lambda: Plain(attn + "o_proj.weight"),
        # Qwen3's per-head norms `# [d]`: one weight for every head, replicated over TP.
        "self_attention.q_layernorm.weight": lambda: Plain(attn + "q_norm.weight"),
        "self_attention.k_layernorm.weight": lambda: Plain(attn + "k_norm.weight"),
    }
    if family.moe is None:
        table.update({
            "mlp.linear_fc1.weight": lambda: (GLU(mlp + "gate_proj.weight", mlp + "up_proj.weight",
                                                  cfg.ffn_hidden_size)
                                              if cfg.gated_linear_unit else Plain(mlp + "up_proj.weight")),
            "mlp.linear_fc2.weight": lambda: Plain(mlp + "down_proj.weight"),
        })
    if suffix in table:
        return table[suffix]()
    moe = _moe_source(suffix, hf, cfg, family, expert_offset) if family.moe is not None else None
    return moe if moe is not None else _norm_source(name, suffix, hf, norm)


def _norm_source(name: str, suffix: str, hf: str, norm: List[str]) -> Plain:
    # Local spec: separate norm modules; Transformer Engine spec: fused into the linears.
    for prefix, hf_norm in (("input_layernorm.", "input_layernorm."),
                            ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
                            ("pre_mlp_layernorm.", "post_attention_layernorm."),
                            ("mlp.linear_fc1.layer_norm_", "post_attention_layernorm.")):
        if suffix.startswith(prefix):
            return _norm(hf + hf_norm, suffix[len(prefix):], norm)
    raise KeyError(name)


def _moe_source(suffix: str, hf: str, cfg: ModelConfig, family: Family, expert_offset: int):
    """The Source of a MoE layer's MLP parameter (`suffix` after `decoder.layers.<i>.`), else None."""
    moe = f"{hf}{family.moe}."
    expert = expert_of(suffix)
    if expert is not None:
        e = f"{moe}experts.{expert[0] + expert_offset}."
        gate, up, down = ("w1", "w3", "w2") if family is MIXTRAL else ("gate_proj", "up_proj", "down_proj")
        if expert[1] == "linear_fc1.weight":
            return GLU(f"{e}{gate}.weight", f"{e}{up}.weight", cfg.moe_ffn_hidden_size)
        return Plain(f"{e}{down}.weight") if expert[1] == "linear_fc2.weight" else None
    shared = f"{moe}shared_expert."
    table = {
        "mlp.router.weight": lambda: Plain(f"{moe}gate.weight"),
        "mlp.shared_experts.linear_fc1.weight": lambda: GLU(f"{shared}gate_proj.weight", f"{shared}up_proj.weight",
                                                            cfg.moe_shared_expert_intermediate_size),
        "mlp.shared_experts.linear_fc2.weight": lambda: Plain(f"{shared}down_proj.weight"),
        "mlp.shared_experts.gate_weight": lambda: Plain(f"{moe}shared_expert_gate.weight"),
    }
    return table[suffix]() if suffix in table else None


def expert_offset_of(cfg: ModelConfig, ep_rank: int, ep_size: int) -> int:
    """Global index of this EP rank's first routed expert (0 for a dense model)."""
    return ep_rank * (cfg.num_moe_experts // ep_size) if cfg.is_moe else 0


def tp_of(name: str, tp_rank: int, tp_size: int) -> Tuple[int, int]:
    """(rank, size) of the TP split that parameter `name` has: a routed expert is whole on its
    EP rank (expert TP 1), whatever its tensor-parallel attributes say."""
    return (0, 1) if is_routed_expert_param(name) else (tp_rank, tp_size)


def _norm(prefix: str, kind: str, allowed: List[str]) -> Plain:
    if kind not in allowed:
        raise KeyError(prefix + kind)
    return Plain(prefix + kind)


def _qkv(attn: str, kind: str, cfg: ModelConfig) -> QKV:
    per_group = cfg.num_attention_heads // cfg.num_query_groups
    return QKV(f"{attn}q_proj.{kind}", f"{attn}k_proj.{kind}", f"{attn}v_proj.{kind}", per_group, cfg.kv_channels)


def expected_hf_shapes(cfg: ModelConfig, family: Family) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a HF checkpoint of `cfg` holds, with its shape (tied models have no lm_head)."""
    cfg = cfg.resolved()
    h, d, ffn = cfg.hidden_size, cfg.kv_channels, cfg.ffn_hidden_size
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    shapes.update({f"model.norm.{k}": (h,) for k in _norm_kinds(family)})
    if not cfg.share_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)})
        if cfg.add_qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if cfg.qk_layernorm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        if family.moe is not None:
            shapes.update(_moe_shapes(p + family.moe + ".", cfg, family))
        else:
            mlp = ("gate", "up") if cfg.gated_linear_unit else ("up",)
            shapes.update({p + f"mlp.{x}_proj.weight": (ffn, h) for x in mlp})
            shapes[p + "mlp.down_proj.weight"] = (h, ffn)
        shapes.update({p + f"{n}.{k}": (h,) for n in ("input_layernorm", "post_attention_layernorm")
                       for k in _norm_kinds(family)})
    return shapes


def _moe_shapes(moe: str, cfg: ModelConfig, family: Family) -> Dict[str, Tuple[int, ...]]:
    """One layer's MoE tensors (`moe`: its module prefix) with their shapes."""
    h, f = cfg.hidden_size, cfg.moe_ffn_hidden_size
    names = ("w1", "w3", "w2") if family is MIXTRAL else ("gate_proj", "up_proj", "down_proj")
    shapes = {moe + "gate.weight": (cfg.num_moe_experts, h)}
    for e in range(cfg.num_moe_experts):
        shapes.update({f"{moe}experts.{e}.{names[0]}.weight": (f, h), f"{moe}experts.{e}.{names[1]}.weight": (f, h),
                       f"{moe}experts.{e}.{names[2]}.weight": (h, f)})
    shared = cfg.moe_shared_expert_intermediate_size
    if shared:
        shapes.update({moe + "shared_expert.gate_proj.weight": (shared, h), moe + "shared_expert.up_proj.weight":
                       (shared, h), moe + "shared_expert.down_proj.weight": (h, shared)})
    if cfg.moe_shared_expert_gate:
        shapes[moe + "shared_expert_gate.weight"] = (1, h)
    return shapes


def _norm_kinds(family: Family) -> Tuple[str, ...]:
    return ("weight", "bias") if family is NEMOTRON else ("weight",)


def shard_ranges(size: int, tp_rank: int, tp_size: int, stride: int) -> List[Tuple[int, int]]:
    """This rank's ranges of the full TP dim: chunk `tp_rank` of each of the `stride` blocks."""
    block, chunk = size // stride, size // (stride * tp_size)
    return [(j * block + tp_rank * chunk, j * block + (tp_rank + 1) * chunk) for j in range(stride)]


def shard_pieces(param: torch.Tensor, tp_rank: int, tp_size: int) -> List[Tuple[int, int, int]]:
    """Where TP rank `tp_rank`'s shard of `param` lies in the full tensor, along partition_dim:
    (full start, local start, length) of each of its `partition_stride` blocks."""
    dim, stride = param.partition_dim, int(getattr(param, "partition_stride", 1))
    pieces, local = [], 0
    for a, b in shard_ranges(full_shape(param, tp_size)[dim], tp_rank, tp_size, stride):
        pieces.append((a, local, b - a))
        local += b - a
    return pieces


def fill_shard(source, read: Reader, out: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> None:
    """Fill `out` (this rank's shard of `param`) from the HF tensors: only the rows/columns it holds."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        source.read_into(read, 0, 0, out.shape[0], out)
        return
    dim = param.partition_dim
    for start, local, length in shard_pieces(param, tp_rank, tp_size):
        source.read_into(read, dim, start, start + length, out.narrow(dim, local, length))


def full_shape(param: torch.Tensor, tp_size: int) -> Tuple[int, ...]:
    """The TP=1 shape of `param` from its local shard."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def layer_offset_of(model) -> int:
    """Global index of this stage's first layer (Megatron numbers layers from 1)."""
    layers = list(model.decoder.layers)
    return layers[0].layer_number - 1 if layers else 0
