"""An independent float64 reference for every importance statistic.

Plain PyTorch: forward hooks on the TP=1 model's modules (found by Megatron's names,
not through model/probes.py) capture whole activations; statistics are computed
from their definitions in float64 with torch's own mean / norm / var, over the
full [seq, samples] tensors -- no running sums, no sharding.
"""

from collections import defaultdict

import torch
import torch.nn.functional as F


def seq_then_batch(a: torch.Tensor, seq_agg: str, batch_agg: str) -> torch.Tensor:
    """a: [s, N, n] float64 per-token values -> [n]."""

    def agg(x, how):
        if how == "mean":
            return x.abs().mean(0)
        if how == "l2":
            return torch.linalg.vector_norm(x, dim=0)
        return x.var(0, unbiased=False)

    return agg(agg(a, seq_agg), batch_agg)


@torch.no_grad()
def capture(model, batches):
    """{site: [s, N, ...] float64} for every statistic site of every layer, over all batches."""
    acts = defaultdict(list)
    handles = []

    def keep(name, pick):
        return lambda module, *hook_args: acts[name].append(pick(*hook_args).double())

    decoder = model.decoder
    for i, layer in enumerate(decoder.layers):
        if hasattr(layer.mlp, "linear_fc2"):  # a dense MLP; MoE layers: capture_moe
            handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(keep(f"fc2_{i}", lambda a: a[0])))
        handles += [
            layer.self_attention.linear_proj.register_forward_pre_hook(keep(f"proj{i}", lambda a: a[0])),
            layer.input_layernorm.register_forward_hook(keep(f"norm_in{i}", lambda a, o: o)),
            layer.pre_mlp_layernorm.register_forward_hook(keep(f"norm_mlp{i}", lambda a, o: o)),
            layer.input_layernorm.register_forward_hook(keep(f"normx_in{i}", lambda a, o: a[0])),
            layer.pre_mlp_layernorm.register_forward_hook(keep(f"normx_mlp{i}", lambda a, o: a[0])),
            layer.register_forward_hook(keep(f"layer_in{i}", lambda a, k, o: k["hidden_states"]), with_kwargs=True),
            layer.register_forward_hook(keep(f"layer_out{i}", lambda a, k, o: o[0]), with_kwargs=True),
        ]
    handles.append(decoder.final_layernorm.register_forward_hook(keep("norm_final", lambda a, o: o)))
    handles.append(decoder.final_layernorm.register_forward_hook(keep("normx_final", lambda a, o: a[0])))
    model.eval()
    for batch in batches:
        model(batch["tokens"], batch["position_ids"], None)
    for h in handles:
        h.remove()
    return {name: torch.cat(chunks, dim=1) for name, chunks in acts.items()}  # cat over samples


def norm_moments(x: torch.Tensor, normalization: str, eps: float) -> torch.Tensor:
    """[2, h]: mean over all tokens of z and z^2, z = x normalised by torch's own norm (no gamma)."""
    h = x.shape[-1]
    norm = F.layer_norm if normalization == "LayerNorm" else F.rms_norm
    z = norm(x.reshape(-1, h), (h,), eps=eps)
    return torch.stack([z.mean(0), z.square().mean(0)])


def reference_scores(acts: dict, num_layers: int, heads: int, groups: int, seq_agg: str, batch_agg: str,
                     normalization: str = "RMSNorm", eps: float = 1e-5) -> dict:
    """Expected score tensors (contract names) from captured activations."""
    head_rows, neuron_rows, bi = [], [], []
    channel = 0
    norm_outputs = [acts[f"norm_{kind}{i}"] for i in range(num_layers) for kind in ("in", "mlp")] + [acts["norm_final"]]
    by_norm = torch.stack([seq_then_batch(y, seq_agg, batch_agg) for y in norm_outputs])  # [2L+1, h]
    inputs = [acts.get(f"normx_{kind}{i}") for i in range(num_layers) for kind in ("in", "mlp")]
    inputs.append(acts.get("normx_final"))
    h = by_norm.shape[-1]
    moments = torch.stack([torch.zeros(2, h, dtype=torch.float64) if x is None else
                           norm_moments(x, normalization, eps) for x in inputs])  # [2L+1, 2, h]
    for i in range(num_layers):
        proj = acts[f"proj{i}"]  # [s, N, heads * d]
        s, n, _ = proj.shape
        per_head = torch.linalg.vector_norm(proj.view(s, n, heads, -1), dim=-1)  # [s, N, heads]
        head_rows.append(seq_then_batch(per_head, seq_agg, batch_agg))
        if f"fc2_{i}" in acts:
            neuron_rows.append(seq_then_batch(acts[f"fc2_{i}"], seq_agg, batch_agg))
        channel = channel + seq_then_batch(acts[f"norm_in{i}"], seq_agg, batch_agg) \
            + seq_then_batch(acts[f"norm_mlp{i}"], seq_agg, batch_agg)
        cos = F.cosine_similarity(acts[f"layer_in{i}"], acts[f"layer_out{i}"], dim=-1)  # [s, N]
        bi.append(1 - cos.mean())
    channel = channel + seq_then_batch(acts["norm_final"], seq_agg, batch_agg)
    head = torch.stack(head_rows)
    return {
        "attn.head": head,
        "attn.group": head.view(num_layers, groups, heads // groups).sum(-1),
        **({"mlp.neuron": torch.stack(neuron_rows)} if neuron_rows else {}),
        "hidden.channel": channel,
        "hidden.channel_by_norm": by_norm,
        "hidden.norm_moments": moments,
        "depth.block_importance": torch.stack(bi),
    }


@torch.no_grad()
def loss_without(model, batches, drop) -> float:
    """Token-mean float64 CE of the model with layers `drop` deleted from its ModuleList."""
    layers = model.decoder.layers
    model.decoder.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i not in set(drop)])
    try:
        total, count = 0.0, 0
        for batch in batches:
            logits = model(batch["tokens"], batch["position_ids"], None).double()  # [b, s, vocab]
            total += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").item()
            count += batch["labels"].numel()
        return total / count
    finally:
        model.decoder.layers = layers


@torch.no_grad()
def capture_moe(model, batches):
    """{site: list of activations, one per microbatch} of every MoE layer of the EP=1 model:
    the router's routing map [tokens, E], each expert MLP's linear_fc2 input [tokens routed to it,
    F] and its output [tokens routed to it, h] (the expert module's own output, not Megatron's
    concatenation of them), and the shared expert's linear_fc2 input [s, b, S]."""
    acts = defaultdict(list)
    handles = []

    def keep(name, pick):
        return lambda module, *hook_args: acts[name].append(pick(*hook_args).detach().double())

    for i, layer in enumerate(model.decoder.layers):
        moe = layer.mlp
        handles.append(moe.router.register_forward_hook(keep(f"routing{i}", lambda a, o: o[1])))
        for e, expert in enumerate(moe.experts.local_experts):
            handles.append(expert.linear_fc2.register_forward_pre_hook(keep(f"expert_in{i}_{e}", lambda a: a[0])))
            handles.append(expert.register_forward_hook(keep(f"expert_out{i}_{e}", lambda a, o: o[0])))
        if moe.shared_experts is not None:
            handles.append(moe.shared_experts.linear_fc2.register_forward_pre_hook(
                keep(f"shared{i}", lambda a: a[0])))
    model.eval()
    for batch in batches:
        model(batch["tokens"], batch["position_ids"], None)
    for h in handles:
        h.remove()
    return acts


def _pooled(a: torch.Tensor, seq_agg: str) -> torch.Tensor:
    """`seq_agg` over the rows (tokens) of a [n, F] -> [F]; zeros when no token came."""
    if a.shape[0] == 0:
        return torch.zeros(a.shape[1], dtype=torch.float64)
    if seq_agg == "mean":
        return a.abs().mean(0)
    if seq_agg == "l2":
        return torch.linalg.vector_norm(a, dim=0)
    return a.var(0, unbiased=False)


def reference_moe_scores(acts, num_layers: int, num_experts: int, seq_agg: str, batch_agg: str) -> dict:
    """Expected moe.* scores from `capture_moe`'s activations, by their definitions."""
    expert, frequency, expert_neuron, neuron, shared = [], [], [], [], []
    for i in range(num_layers):
        routing = torch.cat(acts[f"routing{i}"])  # [tokens, E]
        frequency.append(routing.sum(0) / routing.shape[0])
        ins = [torch.cat(acts[f"expert_in{i}_{e}"]) for e in range(num_experts)]  # [n_e, F] each
        outs = [torch.cat(acts[f"expert_out{i}_{e}"]) for e in range(num_experts)]  # [n_e, h] each
        expert.append(torch.stack([torch.linalg.vector_norm(y, dim=-1).mean() if y.shape[0] else
                                   torch.zeros((), dtype=torch.float64) for y in outs]))
        expert_neuron.append(torch.stack([_pooled(a, seq_agg) for a in ins]))
        neuron.append(_pooled(torch.cat(ins), seq_agg))
        if f"shared{i}" in acts:
            shared.append(seq_then_batch(torch.cat(acts[f"shared{i}"], dim=1), seq_agg, batch_agg))
    out = {"moe.expert": torch.stack(expert), "moe.expert_frequency": torch.stack(frequency),
           "moe.expert_neuron": torch.stack(expert_neuron), "moe.neuron": torch.stack(neuron)}
    if shared:
        out["moe.shared_neuron"] = torch.stack(shared)
    return out
