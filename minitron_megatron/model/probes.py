"""Where activation statistics live inside Megatron-core's GPT modules.

The importance stage asks "give me every attention output, MLP intermediate,
norm output and layer input/output" without knowing Megatron's module names;
this module is the one place that knows them:

  layer.self_attention.linear_proj   input  [s, b, heads/tp * kv_channels]   per-head outputs
  layer.mlp.linear_fc2               input  [s, b, ffn/tp]                    (GLU: act(gate) * up)
  layer.input_layernorm              output [s(/tp with SP), b, h]
  layer.pre_mlp_layernorm            output [s(/tp with SP), b, h]
  decoder.final_layernorm            output [s(/tp with SP), b, h]            (last stage only)

A mixture-of-experts layer (Megatron's MoELayer over SequentialMLP; experts are whole on their
EP rank, never TP-split) has, instead of the MLP's linear_fc2:

  layer.mlp.router                    output (probs, routing_map [tokens, experts])  every expert
  layer.mlp.experts                   args (tokens, tokens_per_expert [experts/ep], probs),
                                      output [routed tokens, h], this EP rank's experts in order
  layer.mlp.experts.local_experts.i.linear_fc2  input [tokens routed to i, moe_ffn] (prob-scaled)
  layer.mlp.shared_experts.linear_fc2 input  [s, b, shared/tp]                (when there is one)

With Transformer Engine's spec the two layer norms are `IdentityOp` and the norm is
fused into `linear_qkv` / `linear_fc1` (`layer_norm_weight`), so its output is never
a module output: we hook the fused module's input and recompute the norm.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, List, Optional

import torch
import torch.nn.functional as F

from minitron_megatron.errors import ConfigError

TensorFn = Callable[[torch.Tensor], None]


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The activation a linear module is called with (positional or keyword)."""
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _first_output(output) -> torch.Tensor:
    """Megatron linears return (output, bias); norms return a tensor."""
    return output[0] if isinstance(output, (tuple, list)) else output


HEAD_SITE = "self_attention.linear_proj"
"""The module whose input holds the per-head attention outputs (named in messages)."""
NEURON_SITE = "mlp.linear_fc2"
"""The module whose input holds the MLP neurons' activations."""
ROUTER_SITE = "mlp.router"
EXPERTS_SITE = "mlp.experts"
SHARED_SITE = "mlp.shared_experts.linear_fc2"


@dataclass
class InputProbe:
    """Statistics of the input of `module` (e.g. linear_proj, linear_fc2)."""

    module: torch.nn.Module

    def register(self, fn: TensorFn):
        return self.module.register_forward_pre_hook(lambda m, a, k: fn(_first_input(a, k)), with_kwargs=True)


@dataclass
class NormProbe:
    """A norm output [s(/tp with SP), b, h]; `fused`: recompute it from a TE norm+linear's input."""

    name: str
    module: torch.nn.Module
    fused: bool = False

    def register(self, fn: TensorFn):
        if self.fused:
            hook = lambda m, a, k: fn(recompute_fused_norm(m, _first_input(a, k)))  # noqa: E731
            return self.module.register_forward_pre_hook(hook, with_kwargs=True)
        return self.module.register_forward_hook(lambda m, a, out: fn(_first_output(out)))

    def register_input(self, fn: TensorFn):
        """Call fn(norm input [s(/tp with SP), b, h]) (the fused module's input for TE)."""
        return self.module.register_forward_pre_hook(lambda m, a, k: fn(_first_input(a, k)), with_kwargs=True)


@dataclass
class ExpertsProbe:
    """Megatron's SequentialMLP of one MoE layer: this EP rank's experts and their outputs."""

    module: torch.nn.Module
    first_expert: int
    """Global index of this rank's first expert (EP rank x experts per rank)."""
    expert_fc2: List[InputProbe]
    """Per local expert, its linear_fc2 (input: [tokens routed to it, moe_ffn])."""

    def register(self, fn: Callable[[torch.Tensor, torch.Tensor], None]):
        """Call fn(tokens_per_expert [experts/ep], output [routed tokens, h]) on every forward."""

        def hook(module, args, kwargs, output):
            tokens_per_expert = args[1] if len(args) > 1 else kwargs["tokens_per_expert"]
            fn(torch.as_tensor(tokens_per_expert), _first_output(output))

        return self.module.register_forward_hook(hook, with_kwargs=True)


@dataclass
class MoEProbe:
    """The statistic sites of one MoE layer."""

    router: torch.nn.Module
    experts: ExpertsProbe
    shared_intermediate: Optional[InputProbe]
    """The shared expert's linear_fc2 input [s, b, shared/tp], or None without a shared expert."""

    def register_routing(self, fn: TensorFn):
        """Call fn(routing_map [tokens(/tp with SP), experts] bool) on every forward."""
        return self.router.register_forward_hook(lambda m, a, out: fn(out[1]))


@dataclass
class LayerProbe:
    """One transformer layer of this rank's stage, with its global index and statistic sites."""

    module: torch.nn.Module
    layer_index: int
    """0-based global index (Megatron's `layer_number` is 1-based and already global under PP)."""
    attention_output: InputProbe
    mlp_intermediate: Optional[InputProbe]
    """The dense MLP's linear_fc2 input; None in a MoE layer (see `moe`)."""
    norms: List[NormProbe]
    moe: Optional[MoEProbe] = None

    def register_io(self, fn: Callable[[torch.Tensor, torch.Tensor], None]):
        """Call fn(layer input, layer output), both [s(/tp with SP), b, h]."""

        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            fn(hidden, _first_output(output))

        return self.module.register_forward_hook(hook, with_kwargs=True)


@dataclass
class ModelProbes:
    """Everything the importance collector hooks on this rank, plus the local/global sizes."""

    layers: List[LayerProbe]
    final_norm: Optional[NormProbe]
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    tp_size: int
    sequence_parallel: bool
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    chunks: List[torch.nn.Module] = field(default_factory=list)
    num_moe_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None

    @property
    def heads_local(self) -> int:
        return self.num_attention_heads // self.tp_size

    @property
    def ffn_local(self) -> int:
        return self.ffn_hidden_size // self.tp_size

    @property
    def shared_local(self) -> int:
        """The shared expert's width on this TP rank (it is split like a dense MLP)."""
        return (self.moe_shared_expert_intermediate_size or 0) // self.tp_size

    @property
    def moe_layers(self) -> List[LayerProbe]:
        return [p for p in self.layers if p.moe is not None]

    def all_norms(self) -> Iterator[NormProbe]:
        for layer in self.layers:
            yield from layer.norms
        if self.final_norm is not None:
            yield self.final_norm


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _is_identity(module) -> bool:
    from megatron.core.transformer.identity_op import IdentityOp

    return module is None or isinstance(module, IdentityOp)


def _norm_probe(name: str, norm, fused_linear) -> Optional[NormProbe]:
    if not _is_identity(norm):
        return NormProbe(name, norm)
    if fused_linear is not None and getattr(fused_linear, "layer_norm_weight", None) is not None:
        return NormProbe(name, fused_linear, fused=True)
    return None


def _moe_probe(mlp, where: str) -> Optional[MoEProbe]:
    """The sites of a Megatron MoELayer (None for any other MLP); ConfigError for experts that
    are not one MLP per expert (TE's grouped GEMM keeps all experts in one weight)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    if not isinstance(mlp, MoELayer):
        return None
    local = getattr(mlp.experts, "local_experts", None)
    if local is None:
        raise ConfigError(f"importance: layer {where}'s experts are {type(mlp.experts).__name__}; scoring needs "
                          "one MLP per expert (SequentialMLP): set model.moe_grouped_gemm=false")
    shared = getattr(mlp, "shared_experts", None)
    experts = ExpertsProbe(mlp.experts, mlp.local_expert_indices[0], [InputProbe(e.linear_fc2) for e in local])
    return MoEProbe(mlp.router, experts, InputProbe(shared.linear_fc2) if shared is not None else None)


def _layer_probe(layer, where: str) -> LayerProbe:
    attn, mlp = getattr(layer, "self_attention", None), getattr(layer, "mlp", None)
    proj, fc2 = getattr(attn, "linear_proj", None), getattr(mlp, "linear_fc2", None)
    moe = _moe_probe(mlp, where)
    if proj is None or (fc2 is None and moe is None):
        missing = "self_attention.linear_proj" if proj is None else f"mlp.linear_fc2 (mlp is {type(mlp).__name__})"
        raise ConfigError(
            f"importance: layer {where} has no {missing}; only dense GPT layers (Megatron local or "
            "Transformer Engine spec) and Megatron's MoELayer are supported, not SSM or other layers"
        )
    index = layer.layer_number - 1
    norms = [
        _norm_probe(f"layer{index}.input_norm", layer.input_layernorm, getattr(attn, "linear_qkv", None)),
        _norm_probe(f"layer{index}.pre_mlp_norm", layer.pre_mlp_layernorm, getattr(mlp, "linear_fc1", None)),
    ]
    norms = [n for n in norms if n is not None]
    if not norms:
        raise ConfigError(f"importance: layer {where} has neither a norm module nor a fused norm "
                          "(layer_norm_weight) before attention or MLP; hidden-channel scores need them")
    return LayerProbe(layer, index, InputProbe(proj), InputProbe(fc2) if moe is None else None, norms, moe)


def find_probes(model_chunks) -> ModelProbes:
    """Statistic sites of this rank's model chunk(s); ConfigError if the layout is not a GPT we know."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    chunks = [unwrap(c) for c in (model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks])]
    layers, final_norm = [], None
    for chunk in chunks:
        decoder = getattr(chunk, "decoder", None)
        found = [m for m in (decoder.layers if decoder is not None else []) if isinstance(m, TransformerLayer)]
        if decoder is None or not found:
            raise ConfigError(f"importance: {type(chunk).__name__} has no decoder.layers of TransformerLayer; "
                              "expected a Megatron-core GPTModel")
        layers += [_layer_probe(layer, f"{layer.layer_number - 1}") for layer in found]
        if getattr(decoder, "final_layernorm", None) is not None:
            final_norm = NormProbe("final_norm", decoder.final_layernorm)
    config = chunks[0].config
    return ModelProbes(
        layers=sorted(layers, key=lambda p: p.layer_index),
        final_norm=final_norm,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_query_groups or config.num_attention_heads,
        kv_channels=config.kv_channels,
        ffn_hidden_size=config.ffn_hidden_size,
        tp_size=config.tensor_model_parallel_size,
        sequence_parallel=bool(config.sequence_parallel),
        normalization=getattr(config, "normalization", "LayerNorm"),
        layernorm_epsilon=float(getattr(config, "layernorm_epsilon", 1e-5)),
        chunks=chunks,
        num_moe_experts=getattr(config, "num_moe_experts", None),
        moe_ffn_hidden_size=getattr(config, "moe_ffn_hidden_size", None),
        moe_shared_expert_intermediate_size=getattr(config, "moe_shared_expert_intermediate_size", None),
    )


def _norm_settings(module) -> tuple:
    """(normalization, eps, zero_centered_gamma) of a TE norm+linear module."""
    config = getattr(module, "config", None)
    kind = getattr(module, "normalization", None) or getattr(config, "normalization", "LayerNorm")
    eps = getattr(module, "eps", None)
    eps = eps if eps is not None else getattr(config, "layernorm_epsilon", 1e-5)
    zero_centered = getattr(module, "zero_centered_gamma", None)
    if zero_centered is None:
        zero_centered = getattr(config, "layernorm_zero_centered_gamma", False)
    return kind, eps, bool(zero_centered)


@torch.no_grad()
def recompute_fused_norm(module, x: torch.Tensor) -> torch.Tensor:
    """The output of the norm fused into a TE LayerNorm*Linear module, from its input.

    x: [s(/tp with SP), b, h] -> [s(/tp with SP), b, h] in float32 (statistics only).
    """
    kind, eps, zero_centered = _norm_settings(module)
    weight = module.layer_norm_weight.float()
    weight = weight + 1 if zero_centered else weight
    x = x.float()
    if kind == "RMSNorm":
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight
    bias = getattr(module, "layer_norm_bias", None)
    return F.layer_norm(x, (x.shape[-1],), weight, None if bias is None else bias.float(), eps)


def _identity_forward(*args, **kwargs):
    """A TransformerLayer.forward that passes its input through: (hidden_states, context)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return hidden, kwargs.get("context")


@torch.no_grad()
def normalized_input(x: torch.Tensor, normalization: str, eps: float) -> torch.Tensor:
    """z, the norm's input normalised before its gamma/beta: [.., h] -> [.., h] float32.

    RMSNorm: x / sqrt(mean x^2 + eps); LayerNorm: (x - mean) / sqrt(var + eps).
    """
    x = x.float()
    if normalization == "LayerNorm":
        return F.layer_norm(x, (x.shape[-1],), None, None, eps)
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


@contextmanager
def skipped_layers(probes: ModelProbes, layer_indices: Iterable[int]):
    """Make the given 0-based global layers identities for the duration (the stages holding them).

    Shadowing `forward` on the instance keeps the module, its hooks and its parameters in
    place, so the pipeline schedule, p2p shapes and the other stages are unaffected.
    """
    wanted = set(layer_indices)
    patched = [p.module for p in probes.layers if p.layer_index in wanted]
    shadowed = [layer.__dict__.get("forward") for layer in patched]  # a wrapper's own patch, if any
    for layer in patched:
        layer.forward = _identity_forward
    try:
        yield
    finally:
        for layer, previous in zip(patched, shadowed):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
