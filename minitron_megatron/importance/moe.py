"""Mixture-of-experts statistics: experts, expert-FFN neurons and routing, at any TP/EP/PP/DP.

Hooks on every MoE layer of this rank's stage add float64 sums, in this rank's own layout
(model/probes.py names the sites):

  router     tokens routed to each expert (every expert, from routing_map) and tokens routed
  experts    per expert of this EP rank: sum over its routed tokens of ||output||_2 (Megatron's
             SequentialMLP output: the expert's output scaled by its routing probability) and
             the number of those tokens
  fc2 input  per expert, per neuron of its FFN, a = the prob-scaled act(gate) * up feeding
             linear_fc2: sums of |a|, a and a^2 over the tokens routed to it

Scores (global order: layer, expert as Megatron numbers them across EP ranks):

  moe.expert            [L, E]     mean over the tokens routed to the expert of ||output||_2
  moe.expert_frequency  [L, E]     fraction of tokens routed to the expert (sums to top-k)
  moe.expert_neuron     [L, E, F]  `seq_agg` over the tokens routed to the expert: mean |a|,
                                   sqrt(sum a^2) or the variance; routed tokens form no
                                   per-sample sequences, so there is no batch stage
  moe.neuron            [L, F]     the same over every routed (token, expert) pair: a score per
                                   neuron of the width all experts share
  (moe.shared_neuron, the shared expert's, is a dense MLP's: the collector's seq-then-batch stat)

Reduction: a (layer, expert) sum lives only on the ranks that hold the expert, each over its
own tokens. Written at its global (layer, expert) index into zeros, one sum over the world adds
every token once per TP rank that computed it: without sequence parallelism all TP ranks route
and compute the same tokens (whichever dispatcher, whatever EP), so the sums are divided by TP;
with it each TP rank holds its own s/tp tokens.
"""

from typing import Dict, List

import torch
import torch.distributed as dist

from minitron_megatron.model.probes import EXPERTS_SITE, ROUTER_SITE, ModelProbes
from minitron_megatron.runtime.context import ParallelContext

MOE_SCORES = ("moe.expert", "moe.expert_frequency", "moe.expert_neuron", "moe.neuron")


class MoEStats:
    """Local sums for every MoE layer of this stage; use `hooks()` inside the collector."""

    def __init__(self, probes: ModelProbes, ctx: ParallelContext):
        self.probes, self.ctx = probes, ctx
        experts, ffn, dev = probes.num_moe_experts, probes.moe_ffn_hidden_size, ctx.device
        self.layers = {p.layer_index: p.moe for p in probes.moe_layers}
        local = {i: len(moe.experts.expert_fc2) for i, moe in self.layers.items()}
        self.routed = {i: torch.zeros(experts, dtype=torch.float64, device=dev) for i in self.layers}  # [E]
        self.routed_tokens = {i: torch.zeros(1, dtype=torch.float64, device=dev) for i in self.layers}
        self.output_norms = {i: torch.zeros(2, n, dtype=torch.float64, device=dev)  # [2, E/ep]: sum ||y||, tokens
                             for i, n in local.items()}
        self.fc2_moments = {i: torch.zeros(n, 3, ffn, dtype=torch.float64, device=dev)  # [E/ep, 3, F]
                            for i, n in local.items()}
        self.calls: Dict[str, int] = {f"layer{i}.{site}": 0 for i in self.layers for site in (ROUTER_SITE, EXPERTS_SITE)}

    def _on_routing(self, layer: int):
        def hook(routing_map: torch.Tensor) -> None:  # [tokens(/tp with SP), E] bool
            self.routed[layer] += routing_map.sum(0, dtype=torch.float64)
            self.routed_tokens[layer] += routing_map.shape[0]
            self.calls[f"layer{layer}.{ROUTER_SITE}"] += 1

        return hook

    def _on_experts(self, layer: int):
        def hook(tokens_per_expert: torch.Tensor, y: torch.Tensor) -> None:  # [E/ep], [routed tokens, h]
            counts = tokens_per_expert.to(device=y.device, dtype=torch.long)
            expert = torch.repeat_interleave(torch.arange(counts.numel(), device=y.device), counts)  # [routed]
            norms = torch.linalg.vector_norm(y.detach(), dim=-1, dtype=torch.float64)  # [routed]
            self.output_norms[layer][0].index_add_(0, expert, norms)
            self.output_norms[layer][1] += counts.to(torch.float64)
            self.calls[f"layer{layer}.{EXPERTS_SITE}"] += 1

        return hook

    def _on_expert_fc2(self, layer: int, local: int):
        def hook(a: torch.Tensor) -> None:  # [tokens routed to this expert, F]
            a = a.detach().to(torch.float64)
            self.fc2_moments[layer][local] += torch.stack([a.abs().sum(0), a.sum(0), a.square().sum(0)])

        return hook

    def register(self) -> List:
        """Register every hook; returns the handles."""
        handles = []
        for layer, moe in self.layers.items():
            handles.append(moe.register_routing(self._on_routing(layer)))
            handles.append(moe.experts.register(self._on_experts(layer)))
            handles += [fc2.register(self._on_expert_fc2(layer, local))
                        for local, fc2 in enumerate(moe.experts.expert_fc2)]
        return handles

    def global_sums(self) -> Dict[str, torch.Tensor]:
        """Every sum at its global (layer, expert) index, summed over the world (see module doc)."""
        probes, dev = self.probes, self.ctx.device
        L, E, F = probes.num_layers, probes.num_moe_experts, probes.moe_ffn_hidden_size
        out = {"routed": torch.zeros(L, E, dtype=torch.float64, device=dev),
               "routed_tokens": torch.zeros(L, dtype=torch.float64, device=dev),
               "output_norms": torch.zeros(2, L, E, dtype=torch.float64, device=dev),
               "fc2_moments": torch.zeros(L, E, 3, F, dtype=torch.float64, device=dev)}
        for layer, moe in self.layers.items():
            experts = slice(moe.experts.first_expert, moe.experts.first_expert + len(moe.experts.expert_fc2))
            out["routed"][layer] = self.routed[layer]
            out["routed_tokens"][layer] = self.routed_tokens[layer]
            out["output_norms"][:, layer, experts] = self.output_norms[layer]
            out["fc2_moments"][layer, experts] = self.fc2_moments[layer]
        if dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([t.reshape(-1) for t in out.values()])
            dist.all_reduce(flat)
            for t, chunk in zip(out.values(), flat.split([t.numel() for t in out.values()])):
                t.copy_(chunk.view_as(t))
        copies = 1 if probes.sequence_parallel else self.ctx.tp_size  # each TP rank saw the same tokens
        return {name: t / copies for name, t in out.items()}


def expert_neuron_finish(moments: torch.Tensor, tokens: torch.Tensor, seq_agg: str) -> torch.Tensor:
    """`seq_agg` over pooled tokens from their sums: [..., 3, F] (sum |a|, sum a, sum a^2) and
    token counts [...] -> [..., F]; 0 for an expert no token reached."""
    n = tokens.clamp_min(1).unsqueeze(-1)
    if seq_agg == "mean":
        return moments[..., 0, :] / n
    if seq_agg == "l2":
        return moments[..., 2, :].sqrt()
    mean = moments[..., 1, :] / n
    return (moments[..., 2, :] / n - mean.square()).clamp_min(0)


def moe_scores(stats: MoEStats, seq_agg: str) -> Dict[str, torch.Tensor]:
    """The global MoE scores (module doc) for the model's MoE layers (zeros for dense layers)."""
    sums = stats.global_sums()
    tokens = sums["output_norms"][1]  # [L, E]
    return {
        "moe.expert": sums["output_norms"][0] / tokens.clamp_min(1),
        "moe.expert_frequency": sums["routed"] / sums["routed_tokens"].clamp_min(1).unsqueeze(-1),
        "moe.expert_neuron": expert_neuron_finish(sums["fc2_moments"], tokens, seq_agg),
        "moe.neuron": expert_neuron_finish(sums["fc2_moments"].sum(1), tokens.sum(1), seq_agg),
    }
