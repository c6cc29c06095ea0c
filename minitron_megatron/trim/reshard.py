"""Tensor-parallel resharding of kept units: each TP rank ends with an equal contiguous share.

A TP-sharded parameter is viewed as units (query groups or neurons) along its partition
dim: `[units_local, stride, rows_per_unit, *rest]`. Rank r holds global units
[r*U/tp, (r+1)*U/tp) before trimming. After trimming, the K kept units (ascending global
order) are split evenly: rank r' holds kept positions [r'*K/tp, (r'+1)*K/tp). Because
both orders are ascending, what rank r sends to rank r' is one contiguous run of its kept
units, so one `all_to_all_single` with uneven split sizes moves exactly the rows that
change owner (gloo and NCCL both support uneven splits on dim 0; gloo's list-form
`all_to_all` does not). Nothing else is communicated, and no rank ever holds more than
its own shard plus what it receives.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from minitron_megatron.runtime.context import ParallelContext


def to_units(t: torch.Tensor, tp_dim: int, stride: int, units_local: int) -> torch.Tensor:
    """[.., stride*units*rows (tp_dim), ..] -> [units, stride, rows, *other dims] (a view when possible).

    With stride 2 (GLU fc1 holds [gate_r; up_r]) a unit's two halves are far apart in the
    shard; this view puts them side by side so a neuron moves as one unit.
    """
    x = t.movedim(tp_dim, 0)
    rows = x.shape[0] // (stride * units_local)
    return x.reshape(stride, units_local, rows, *x.shape[1:]).transpose(0, 1)


def from_units(u: torch.Tensor, tp_dim: int) -> torch.Tensor:
    """Inverse of `to_units`: [units, stride, rows, *rest] -> the shard layout, contiguous."""
    units, stride, rows = u.shape[:3]
    x = u.transpose(0, 1).reshape(stride * units * rows, *u.shape[3:])
    return x.movedim(0, tp_dim).contiguous()


@dataclass(frozen=True)
class UnitPlan:
    """One unit axis of one layer, as every rank sees it."""

    units: int
    """Global units before trimming."""
    kept: List[int]
    """Kept global units, ascending."""
    rows: Optional[List[List[int]]] = None
    """Per kept unit: rows kept inside it (None: all rows)."""

    def local_range(self, tp_rank: int, tp_size: int) -> range:
        per = self.units // tp_size
        return range(tp_rank * per, (tp_rank + 1) * per)

    def local_kept(self, tp_rank: int, tp_size: int) -> List[int]:
        """Positions (in `kept`) of the kept units this rank holds before trimming."""
        mine = self.local_range(tp_rank, tp_size)
        return [p for p, unit in enumerate(self.kept) if unit in mine]

    def counts(self, tp_size: int) -> List[List[int]]:
        """counts[src][dst]: kept units that move from old owner src to new owner dst."""
        per_old, per_new = self.units // tp_size, len(self.kept) // tp_size
        counts = [[0] * tp_size for _ in range(tp_size)]
        for pos, unit in enumerate(self.kept):
            counts[unit // per_old][pos // per_new] += 1
        return counts

    def is_identity(self) -> bool:
        return self.rows is None and len(self.kept) == self.units


def select_units(u: torch.Tensor, plan: UnitPlan, ctx: ParallelContext) -> torch.Tensor:
    """This rank's kept units (and rows inside them), still on the old owner: [k_r, stride, rows', ..]."""
    positions = plan.local_kept(ctx.tp_rank, ctx.tp_size)
    offset = plan.local_range(ctx.tp_rank, ctx.tp_size).start
    local = torch.tensor([plan.kept[p] - offset for p in positions], dtype=torch.long, device=u.device)
    u = u.index_select(0, local)
    if plan.rows is None:
        return u
    if not positions:  # this rank keeps none of its units: an empty block of the new row count
        return u.new_empty((0, u.shape[1], len(plan.rows[0]), *u.shape[3:]))
    rows = torch.tensor([plan.rows[p] for p in positions], dtype=torch.long, device=u.device)  # [k_r, rows']
    picked = u.transpose(1, 2)[torch.arange(len(positions), device=u.device)[:, None], rows]
    return picked.transpose(1, 2)  # [k_r, rows', stride, ..] -> [k_r, stride, rows', ..]


def redistribute(u: torch.Tensor, plan: UnitPlan, ctx: ParallelContext) -> torch.Tensor:
    """Kept units [k_r, ..] on their old owners -> [K/tp, ..] on their new owners."""
    return redistribute_over(u, plan, ctx.tp_rank, ctx.tp_size, ctx.tp_group)


def redistribute_over(u: torch.Tensor, plan: UnitPlan, rank: int, size: int, group) -> torch.Tensor:
    """`redistribute` over any group whose ranks hold contiguous runs of the units (TP for
    query groups and neurons, EP for routed experts)."""
    if size == 1:
        return u
    counts = plan.counts(size)
    if all(counts[s][d] == 0 for s in range(size) for d in range(size) if s != d):
        return u  # every kept unit stays where it is (every rank computes the same counts)
    send = counts[rank]
    recv = [counts[src][rank] for src in range(size)]
    out = u.new_empty((sum(recv), *u.shape[1:]))
    dist.all_to_all_single(out, u.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out
