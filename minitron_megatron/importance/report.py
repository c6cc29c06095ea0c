"""Human-readable views of importance scores: a stdout summary and PNG plots."""

from pathlib import Path
from typing import Dict, List

import torch

from minitron_megatron.checkpoint.run_dir import atomic_save_figure

WIDTH_PNG = "importance_width.png"
DEPTH_PNG = "importance_depth.png"


def _spread(t: torch.Tensor) -> str:
    return f"min {t.min().item():.4g}  median {t.median().item():.4g}  max {t.max().item():.4g}"


def _least(t: torch.Tensor, k: int = 5) -> str:
    order = torch.sort(t.reshape(-1), stable=True).indices[:k]
    return ", ".join(str(int(i)) for i in order)


def format_summary(scores: Dict[str, torch.Tensor], meta: dict) -> str:
    """A short table: per-layer head/neuron totals, depth metrics, and the least important units."""
    agg, cal = meta["aggregation"], meta["calibration"]
    L = scores["attn.head"].shape[0]
    neurons = scores["mlp.neuron"] if "mlp.neuron" in scores else scores["moe.neuron"]
    lines = [f"importance: seq={agg['seq']} batch={agg['batch']}, {cal['samples']} calibration samples "
             f"({cal['tokens']} tokens)"]
    depth = [n for n in ("depth.block_importance", "depth.loss_drop") if n in scores]
    lines.append("layer  heads(sum)  neurons(sum)  " + "  ".join(f"{n.split('.')[1]:>16}" for n in depth))
    for i in range(L):
        row = f"{i:5d}  {scores['attn.head'][i].sum().item():10.4g}  {neurons[i].sum().item():12.4g}  "
        lines.append(row + "  ".join(f"{scores[n][i].item():16.4g}" for n in depth))
    if "depth.contiguous" in scores:
        k = meta.get("depth", {}).get("contiguous_k", "?")
        lines.append(f"contiguous k={k} (start: loss increase): " +
                     ", ".join(f"{i}: {v:.4g}" for i, v in enumerate(scores["depth.contiguous"].tolist())))
    for name in ("attn.head", "attn.group", "mlp.neuron", "moe.neuron", "moe.shared_neuron", "moe.expert",
                 "moe.expert_frequency", "hidden.channel"):
        if name in scores:
            lines.append(f"{name:15s} {_spread(scores[name])}")
    if "moe.expert" in scores:
        lines.append(f"least important experts per layer: {[_least(row, 3) for row in scores['moe.expert']]}")
    lines.append(f"least important hidden channels: {_least(scores['hidden.channel'])}")
    for name, order in meta.get("layer_rankings", {}).items():
        lines.append(f"layers by {name} (least important first): {order}")
    return "\n".join(lines)


def _heat(ax, t: torch.Tensor, title: str, xlabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    image = ax.imshow(t.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.figure.colorbar(image, ax=ax)


def save_plots(scores: Dict[str, torch.Tensor], meta: dict, run_dir) -> List[Path]:
    """Heat maps of head and neuron importance per layer, hidden-channel scores, depth bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    agg = meta["aggregation"]
    moe = "moe.expert" in scores
    fig, axes = plt.subplots(4 if moe else 3, 1, figsize=(9, 13 if moe else 10))
    _heat(axes[0], scores["attn.head"], f"attention head importance (seq={agg['seq']}, batch={agg['batch']})", "head")
    if moe:
        _heat(axes[1], scores["moe.neuron"], "expert FFN neuron importance (over every routed token)", "neuron")
        _heat(axes[2], scores["moe.expert"], "expert importance (mean output norm per routed token)", "expert")
    else:
        _heat(axes[1], scores["mlp.neuron"], "MLP neuron importance", "neuron")
    axes[-1].bar(range(scores["hidden.channel"].numel()), scores["hidden.channel"].numpy(), width=1.0)
    axes[-1].set_title("hidden channel importance (summed over norms)")
    axes[-1].set_xlabel("channel")
    fig.tight_layout()
    paths = [run_dir / WIDTH_PNG]
    atomic_save_figure(fig, paths[0])
    plt.close(fig)
    depth = [n for n in ("depth.block_importance", "depth.loss_drop", "depth.contiguous") if n in scores]
    if depth:
        fig, axes = plt.subplots(len(depth), 1, figsize=(8, 2.8 * len(depth)), squeeze=False)
        for ax, name in zip(axes[:, 0], depth):
            ax.bar(range(scores[name].numel()), scores[name].numpy())
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(name)
            ax.set_xlabel("first layer of block" if name == "depth.contiguous" else "layer")
        fig.tight_layout()
        paths.append(run_dir / DEPTH_PNG)
        atomic_save_figure(fig, paths[-1])
        plt.close(fig)
    return paths
