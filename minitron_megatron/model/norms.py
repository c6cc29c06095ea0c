"""Zero-centred-gamma norms for Megatron's local (torch) spec.

Megatron-core 0.16.1 implements `layernorm_zero_centered_gamma` only in its
Transformer Engine norms and in apex's FusedLayerNorm; its torch fallback
(`WrappedTorchNorm`) asserts against it. Without TE or apex (CPU machines, tests)
Nemotron-style models ("layernorm1p") would not build at all, so this module
supplies the one missing piece: a torch norm applying `weight + 1`, with the
constructor signature Megatron's specs call, swapped into the local spec only
when the config asks for zero-centred gamma.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F


class ZeroCenteredGammaNorm(torch.nn.Module):
    """LayerNorm or RMSNorm whose stored weight is gamma - 1 (zeros at init), like
    Megatron's FusedLayerNorm/TENorm with zero_centered_gamma and HF's NemotronLayerNorm1P."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = True, normalization: str = "LayerNorm"):
        super().__init__()
        self.normalization = config.normalization
        self.eps = eps
        self.normalized_shape = (hidden_size,)
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
                     if self.normalization == "LayerNorm" else None)
        for param in self.parameters():  # replicated over TP, like every Megatron norm
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization == "LayerNorm":
            return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)
        return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)


def with_zero_centered_gamma(layer_spec, config, pp_rank: int):
    """The local layer spec as a block spec whose every norm (final one included) is zero-centred.

    The final norm is chosen inside TransformerBlock unless the spec is a full
    `TransformerBlockSubmodules`, hence the block spec.
    """
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = replace(layer_spec, submodules=replace(layer_spec.submodules, input_layernorm=ZeroCenteredGammaNorm,
                                                   pre_mlp_layernorm=ZeroCenteredGammaNorm))
    num_layers = get_num_layers_to_build(config=config, vp_stage=None, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=ZeroCenteredGammaNorm)
