"""Forward hooks that accumulate importance statistics on this rank only.

Hooks never communicate: each adds float64 sums to local accumulators
(`aggregation.WidthStat`), in this rank's own layout (its heads/tp, ffn/tp, its
stage's layers, its EP rank's experts: importance/moe.py). `reduce.reduce_statistics`
turns them into global scores once, at the end. The one exception is sequence parallelism: norm outputs are then
split over the TP ranks along the sequence, and a sample's sequence aggregate
needs all its tokens, so `end_microbatch` (called by the forward step, outside
any hook) sums the pending per-sample partial sums over TP once per microbatch.
"""

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minitron_megatron.errors import ConfigError
from minitron_megatron.importance.aggregation import WidthStat, head_token_norms, seq_finish, seq_moments
from minitron_megatron.importance.moe import MoEStats
from minitron_megatron.model.probes import HEAD_SITE, NEURON_SITE, SHARED_SITE, ModelProbes, normalized_input
from minitron_megatron.runtime.context import ParallelContext


class ImportanceCollector:
    """Local accumulators for every width statistic (and Block Importance) of one stage.

    Use as a context manager around the calibration pass; hooks are removed on exit.
    """

    def __init__(self, probes: ModelProbes, seq_agg: str, ctx: ParallelContext, block_importance: bool = True):
        self.probes, self.seq_agg, self.ctx = probes, seq_agg, ctx
        self.block_importance = block_importance
        device, layers = ctx.device, [p.layer_index for p in probes.layers]
        self.heads: Dict[int, WidthStat] = {i: WidthStat(probes.heads_local, device) for i in layers}
        self.neurons: Dict[int, WidthStat] = {p.layer_index: WidthStat(probes.ffn_local, device)
                                              for p in probes.layers if p.mlp_intermediate is not None}
        # MoE layers: routed experts in `moe`, the shared expert (a dense MLP split over TP) here.
        self.moe = MoEStats(probes, ctx) if probes.num_moe_experts else None  # reduced by every rank
        self.shared: Dict[int, WidthStat] = {p.layer_index: WidthStat(probes.shared_local, device)
                                             for p in probes.moe_layers if p.moe.shared_intermediate is not None}
        self.channels: Dict[str, WidthStat] = {n.name: WidthStat(probes.hidden_size, device)
                                               for n in probes.all_norms()}
        # Per norm, for the norm rescale (trim/hidden.py): [2, h] sums over tokens of z and z^2,
        # z = the normalised norm input, and the token count (this rank's tokens).
        self.moments: Dict[str, torch.Tensor] = {n.name: torch.zeros(2, probes.hidden_size, dtype=torch.float64,
                                                                     device=device) for n in probes.all_norms()}
        self.moment_tokens: Dict[str, torch.Tensor] = {n.name: torch.zeros(1, dtype=torch.float64, device=device)
                                                       for n in probes.all_norms()}
        # [2] per layer: sum over tokens of cos(input, output), token count
        self.block: Dict[int, torch.Tensor] = {i: torch.zeros(2, dtype=torch.float64, device=device) for i in layers}
        self.samples = torch.zeros(1, dtype=torch.float64, device=device)
        self._pending: List[Tuple[str, torch.Tensor, int]] = []  # (norm, [k, b, h] sequence sums, tokens)
        self._count_at = probes.layers[0].layer_index  # samples are counted once per microbatch, here
        self._handles = []

    # -- hooks ---------------------------------------------------------------------------------
    def _on_attention(self, layer: int):
        def hook(x: torch.Tensor) -> None:  # [s, b, heads/tp * d]
            norms = head_token_norms(x.detach(), self.probes.heads_local)  # [s, b, heads/tp]
            if layer == self._count_at:
                self.samples += norms.shape[1]
            self.heads[layer].add(seq_finish(seq_moments(norms, self.seq_agg), norms.shape[0], self.seq_agg))

        return hook

    def _on_mlp(self, stat: WidthStat):
        def hook(x: torch.Tensor) -> None:  # [s, b, ffn/tp] (a shared expert's: [s, b, shared/tp])
            x = x.detach().float()
            stat.add(seq_finish(seq_moments(x, self.seq_agg), x.shape[0], self.seq_agg))

        return hook

    def _on_norm(self, name: str):
        def hook(y: torch.Tensor) -> None:  # [s(/tp with SP), b, h]
            self._pending.append((name, seq_moments(y.detach().float(), self.seq_agg), y.shape[0]))

        return hook

    def _on_norm_input(self, name: str):
        def hook(x: torch.Tensor) -> None:  # [s(/tp with SP), b, h]
            z = normalized_input(x.detach(), self.probes.normalization, self.probes.layernorm_epsilon)
            z = z.reshape(-1, z.shape[-1]).to(torch.float64)  # [tokens, h]
            self.moments[name] += torch.stack([z.sum(0), z.square().sum(0)])
            self.moment_tokens[name] += z.shape[0]

        return hook

    def _on_layer_io(self, layer: int):
        def hook(x_in: torch.Tensor, x_out: torch.Tensor) -> None:  # both [s(/tp with SP), b, h]
            # Row by row over tokens: a [s, b] vector of cosines, never a tokens x tokens matrix.
            cos = F.cosine_similarity(x_in.detach().float(), x_out.detach().float(), dim=-1)
            self.block[layer][0] += cos.sum(dtype=torch.float64)
            self.block[layer][1] += cos.numel()

        return hook

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "ImportanceCollector":
        for p in self.probes.layers:
            self._handles.append(p.attention_output.register(self._on_attention(p.layer_index)))
            if p.layer_index in self.neurons:
                self._handles.append(p.mlp_intermediate.register(self._on_mlp(self.neurons[p.layer_index])))
            if p.layer_index in self.shared:
                self._handles.append(p.moe.shared_intermediate.register(self._on_mlp(self.shared[p.layer_index])))
            self._handles += [n.register(self._on_norm(n.name)) for n in p.norms]
            self._handles += [n.register_input(self._on_norm_input(n.name)) for n in p.norms]
            if self.block_importance:
                self._handles.append(p.register_io(self._on_layer_io(p.layer_index)))
        if self.moe is not None:
            self._handles += self.moe.register()
        if self.probes.final_norm is not None:
            final = self.probes.final_norm
            self._handles += [final.register(self._on_norm(final.name)), final.register_input(self._on_norm_input(final.name))]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if exc[0] is None:
            self.end_microbatch()

    def end_microbatch(self) -> None:
        """Complete the pending norm statistics of the microbatch just run (all stages, all TP ranks)."""
        if not self._pending:
            return
        names, partials, tokens = zip(*self._pending)
        self._pending.clear()
        tp = 1
        if self.probes.sequence_parallel and self.ctx.tp_size > 1:
            # Each TP rank holds [s/tp, b, h] of the same samples: sum the per-sample partial sums.
            tp = self.ctx.tp_size
            flat = torch.cat([p.reshape(-1) for p in partials])
            dist.all_reduce(flat, group=self.ctx.tp_group)
            partials = [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in partials]), partials)]
        for name, partial, local_tokens in zip(names, partials, tokens):
            self.channels[name].add(seq_finish(partial, local_tokens * tp, self.seq_agg))

    def check_every_site_ran(self, microbatches: int) -> None:
        """ConfigError naming the statistic sites that did not see every microbatch.

        A module that exists but is bypassed (e.g. a fused MLP implementation that never
        calls linear_fc2) would otherwise leave silent zero scores.
        """
        sites = {**{f"layer{i}.{HEAD_SITE}": s.calls for i, s in self.heads.items()},
                 **{f"layer{i}.{NEURON_SITE}": s.calls for i, s in self.neurons.items()},
                 **{f"layer{i}.{SHARED_SITE}": s.calls for i, s in self.shared.items()},
                 **{name: s.calls for name, s in self.channels.items()},
                 **(self.moe.calls if self.moe is not None else {})}
        missed = [f"{name} ({calls}/{microbatches})" for name, calls in sites.items() if calls != microbatches]
        if missed:
            raise ConfigError("importance: these statistic sites did not run once per calibration microbatch, so "
                              f"the model's layout is not one we can score: {', '.join(missed)}")
