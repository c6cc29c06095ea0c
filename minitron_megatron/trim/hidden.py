"""Hidden channels: which norm outputs rank them, how they combine, and the norm rescale.

The importance stage stores one score vector per norm output (`hidden.channel_by_norm`,
rows in NORM order below) and per-norm moments of the normalised norm INPUTS
(`hidden.norm_moments`), so that the trimmer can choose the norms and the combination,
and estimate the rescale for any kept set, from ONE calibration pass:

  rows (num_layers L):   2i = layer i input norm,  2i+1 = layer i pre-MLP norm,  2L = final norm

Rescale: a norm over the kept channels K of x takes its statistic over |K| channels
instead of h. With z = the normalised input of the full norm (RMSNorm: x / rms(x);
LayerNorm: (x - mean) / std), the pruned norm computes z_K / s_K(z) (RMSNorm; s_K = rms of
z over K), whereas the unpruned one gave z_K. Multiplying the kept gamma by
s = sqrt(E_tokens[mean_K z^2]) undoes that on average. LayerNorm also re-centres over K:
s = sqrt(E[mean_K z^2] - E[mean_K z]^2) (the second term approximates E[(mean_K z)^2] by its
mean squared: exact for the per-channel moments we keep) and the bias absorbs the shift,
beta_K += gamma_K * E[mean_K z]. Both need only per-channel means of z and z^2
([2, h] per norm, additive over tokens: exact at any TP/PP/DP).
"""

from typing import List, Optional, Tuple

import torch

from minitron_megatron.errors import ConfigError

HIDDEN_NORMS = ("all", "layers", "input", "pre_mlp")
"""all: every norm output (final norm included); layers: the 2 x num_layers per-layer norms;
input / pre_mlp: only the layers' input (pre-attention) / pre-MLP norms."""
HIDDEN_COMBINES = ("sum", "normalized")
"""sum: plain sum of the per-norm score vectors; normalized: each divided by its own sum first."""
NORM_RESCALES = ("auto", "none", "calibrated")
"""auto: calibrated when the scores carry the norm moments (every prune.method=importance run of
this version), none otherwise (random/magnitude baselines, score files from before the moments);
calibrated: required (an error without the moments); none: the plain slice."""
BY_NORM_KEY = "hidden.channel_by_norm"
MOMENTS_KEY = "hidden.norm_moments"


def num_norm_rows(num_layers: int) -> int:
    return 2 * num_layers + 1


def norm_names(num_layers: int) -> List[str]:
    """Row names of the per-norm tensors (the probe names of model/probes.py)."""
    names = [f"layer{i}.{kind}" for i in range(num_layers) for kind in ("input_norm", "pre_mlp_norm")]
    return names + ["final_norm"]


def norm_row(name: str, num_layers: int) -> int:
    return norm_names(num_layers).index(name)


def selected_rows(num_layers: int, hidden_norms: str) -> List[int]:
    if hidden_norms == "all":
        return list(range(num_norm_rows(num_layers)))
    if hidden_norms == "layers":
        return list(range(2 * num_layers))
    if hidden_norms == "input":
        return list(range(0, 2 * num_layers, 2))
    if hidden_norms == "pre_mlp":
        return list(range(1, 2 * num_layers, 2))
    raise ConfigError(f"prune.importance.hidden_norms={hidden_norms!r} is not one of {list(HIDDEN_NORMS)}")


def validate_hidden(hidden_norms: str, hidden_combine: str, norm_rescale) -> List[str]:
    """Problems with the hidden-channel settings (no data needed)."""
    problems = []
    if hidden_norms not in HIDDEN_NORMS:
        problems.append(f"prune.importance.hidden_norms={hidden_norms!r} is not one of {list(HIDDEN_NORMS)}")
    if hidden_combine not in HIDDEN_COMBINES:
        problems.append(f"prune.importance.hidden_combine={hidden_combine!r} is not one of {list(HIDDEN_COMBINES)}")
    if rescale_mode(norm_rescale) is None:
        problems.append(f"prune.norm_rescale={norm_rescale!r} is not one of {list(NORM_RESCALES)} (or true/false)")
    return problems


def rescale_mode(value) -> Optional[str]:
    """'auto' / 'none' / 'calibrated' from a bool or a name (Hydra turns `true` into 'True' for
    a str field); None when it is none of them."""
    text = str(value).lower()
    if text == "auto":
        return "auto"
    if text in ("calibrated", "true"):
        return "calibrated"
    if text in ("none", "false"):
        return "none"
    return None


def combine_hidden(by_norm: torch.Tensor, hidden_norms: str, hidden_combine: str) -> torch.Tensor:
    """Hidden-channel score [h] from per-norm scores [2L+1, h] (float64 arithmetic)."""
    rows = by_norm.double()[selected_rows((by_norm.shape[0] - 1) // 2, hidden_norms)]  # [n, h]
    if hidden_combine == "normalized":
        # A norm whose scores are all zero (absent on this layout) contributes nothing.
        rows = rows / rows.sum(-1, keepdim=True).where(rows.sum(-1, keepdim=True) > 0, torch.ones(()))
    elif hidden_combine != "sum":
        raise ConfigError(f"prune.importance.hidden_combine={hidden_combine!r} is not one of {list(HIDDEN_COMBINES)}")
    return rows.sum(0)


def rescale_factors(moments: torch.Tensor, kept: List[int], normalization: str) -> Tuple[List[float], List[float]]:
    """(scale, shift) per norm row for the kept channels: gamma_K *= scale; beta_K += gamma_K * shift.

    moments: [2L+1, 2, h] = per-channel means over calibration tokens of z and z^2. A row of
    zeros (a norm the model does not have) gets (1, 0).
    """
    m = moments.double()[:, :, kept]  # [N, 2, k]
    mean_z, mean_z2 = m[:, 0].mean(-1), m[:, 1].mean(-1)  # [N]
    if normalization == "LayerNorm":
        var, shift = (mean_z2 - mean_z.square()).clamp_min(0), mean_z
    else:
        var, shift = mean_z2, torch.zeros_like(mean_z)
    present = moments.double()[:, 1].sum(-1) > 0
    scale = torch.where(present & (var > 0), var.sqrt(), torch.ones_like(var))
    shift = torch.where(present, shift, torch.zeros_like(shift))
    return [float(v) for v in scale], [float(v) for v in shift]
