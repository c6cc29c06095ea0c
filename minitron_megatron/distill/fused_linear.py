"""Fused-linear vocab-parallel KD (+ student CE) loss: from hidden states and output weights.

The logits loss of `losses.py` needs both models' `[tokens, V/tp]` logits, which at a
262k vocabulary are the largest tensors of a distillation step. Here the loss
starts one step earlier, from each model's final hidden states (after the final
norm) and its vocab-parallel output weight shard, and walks over chunks of tokens:

    per chunk:  s = h_s W_s^T  [chunk, V_s/tp],  t = h_t W_t^T  [chunk, V/tp]   # the output layers
                local partials of KD (and CE) -> one all_reduce MAX + one SUM over tp_group
                KD = T^2 KL, CE = lse(s) - s[label] (the label's logit lives on one rank)
                with grad: G = dloss/ds for an assumed upstream gradient, then
                dh_s += G W_s, dW_s += G^T h_s                                   # [chunk, h], [V_s/tp, h]

so no logits tensor of either model exists whole; the extra memory is one chunk's
logits (two float32 [chunk, V/tp] buffers, reused in place for every intermediate, and a
few MiB of scratch for the passes that go a vocab block at a time), plus the
(unavoidable) weight gradient.

Gradients are computed in the forward pass, as Liger-Kernel's fused-linear losses do,
which saves re-running both output matmuls in backward. Their loss is a scalar;
ours is per token (the objective masks and weighs tokens later), so the forward
assumes the upstream gradient `lam * w * (1, ce_weight)` per token (kd, ce), where w
is the caller's loss mask when it passes one (`token_weights`), else 1: the usual
case is that mask scaled by 1/num_tokens. Backward takes lam as the most common
ratio upstream / w, scales the precomputed sums by it, and recomputes the logits
only of tokens whose upstream differs (tokens masked by an unannounced mask, or
any upstream at all), adding their correction. The result is exact for every
upstream; only the cost depends on it. Tokens whose weight is 0 cost no gradient
matmuls in forward either, and a chunk of them none at all.

CE normalises over the student's whole padded vocabulary (as Megatron's LM loss,
so "lm loss" stays comparable with `evaluate`); KD over the true vocabulary only.
Mismatched padding at TP > 1: the teacher's weight rows for this rank's student
slice are fetched from their owners once (the teacher is frozen) and cached.
Hidden states must be replicated across TP ranks (with sequence parallelism,
gather them first with a split backward); the hidden-state gradient is all-reduced
over `tp_group` here, in the hidden states' dtype, as Megatron's ColumnParallelLinear
does for its input.

The host reads the device at most twice per call, never per chunk (on a GPU each read
waits for every queued kernel): forward, which chunks hold a token of nonzero weight
(only when given token_weights); backward, how many tokens need recomputing. The vocab
layout is resolved once per shape (`losses.resolve_layout`), and the most common
upstream ratio is found with fixed-size ops (no `torch.unique`, no boolean indexing).
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from minitron_megatron.distill.losses import (
    KINDS,
    VocabLayout,
    _group_size_rank,
    _local_labels,
    _token_slices,
    ce_local_stats,
    global_kl,
    resolve_layout,
    vocab_blocks,
)


_CHUNK_ELEMENTS = 1 << 26
"""Default chunk: 256 MiB per float32 [chunk, V/tp] buffer (two of them): 256 tokens at
V/tp = 262144. Larger than the logits loss's chunks: every chunk streams both [V/tp, h]
output weights through its matmuls and updates the whole weight gradient, which small
chunks make slow (measured on CPU at V 262144, h 4096: the logits matmul at 128 vs 256
tokens, 121 vs 140 GFLOP/s)."""


def default_chunk_tokens(vocab_local: int) -> int:
    """Tokens per chunk for this rank's vocab slice size (at most 4096)."""
    return max(1, min(4096, _CHUNK_ELEMENTS // max(vocab_local, 1)))


@dataclass(frozen=True)
class _FusedConfig:
    tp_group: Optional[dist.ProcessGroup]
    layout: VocabLayout
    reverse: bool
    temperature: float
    chunk_tokens: int
    ce_weight: float  # assumed upstream ratio d/dce : d/dkd (see the module docstring)
    with_ce: bool
    grad_enabled: bool  # autograd records this call (ctx.needs_input_grad ignores no_grad)
    weighted: bool  # the caller passed token_weights (else they are all 1: no chunk is skipped)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    tp_group: Optional[dist.ProcessGroup],
    true_vocab_size: int,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
    ce_weight: float = 0.0,
    token_weights: Optional[torch.Tensor] = None,
    teacher_weight_cache: Optional[dict] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token (T^2 * KL, student CE) from hidden states and vocab-parallel output weights.

    student_hidden: [..., h_s], replicated over TP (gets a gradient, all-reduced over TP);
    student_weight: [v_s_padded/tp, h_s], this rank's rows (gets a gradient);
    teacher_hidden: [..., h_t] and teacher_weight: [v_t_padded/tp, h_t] (no gradients);
    labels: [...] global vocab ids, or None (no CE: the second result is None).
    kind, temperature, true_vocab_size: as for `losses.kd_logit_loss` (padding ids of
    either model are excluded from the KD distributions).
    chunk_tokens: tokens per chunk (default: a float32 [chunk, v_s/tp] buffer is ~256 MiB).
    ce_weight: how the caller weighs CE against KD in its loss; it only decides
    which tokens backward must recompute (exact for any upstream gradient).
    token_weights: [...] like labels, optional: the loss mask (or any per-token weights)
    the caller will multiply the losses by. Like ce_weight it only moves work: tokens it
    zeroes get no gradient work at all (without it, backward recomputes them).
    teacher_weight_cache: a dict kept by the caller across calls, to fetch the teacher's
    re-sliced weight only once when padded vocab sizes differ at TP > 1.
    Returns float32 tensors shaped like `labels` / the leading dims of the hidden states.
    All TP ranks must call this with the same token count and arguments.
    """
    _check_args(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kind, temperature,
                token_weights)
    lead = student_hidden.shape[:-1]
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])  # [tokens, h_s]
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])  # [tokens, h_t]
    layout = resolve_layout(tp_group, (h_s.shape[0], student_weight.shape[0]),
                            (h_s.shape[0], teacher_weight.shape[0]), true_vocab_size, device=h_s.device)
    w_t = _teacher_rows(teacher_weight.detach(), layout, tp_group, teacher_weight_cache)  # [n_valid, h_t]
    with_ce = labels is not None
    flat_labels = labels.reshape(-1) if with_ce else h_s.new_zeros(h_s.shape[0], dtype=torch.long)
    cfg = _FusedConfig(
        tp_group=tp_group, layout=layout, reverse=kind == "reverse_kl", temperature=float(temperature),
        chunk_tokens=chunk_tokens or default_chunk_tokens(layout.student_local),
        ce_weight=float(ce_weight) if with_ce else 0.0, with_ce=with_ce,
        grad_enabled=torch.is_grad_enabled(), weighted=token_weights is not None,
    )
    weights = (torch.ones(h_s.shape[0], dtype=torch.float32, device=h_s.device) if token_weights is None
               else token_weights.detach().reshape(-1).float())  # [tokens]
    kd, ce = _FusedLinearKD.apply(h_s, student_weight, h_t, w_t, flat_labels, weights, cfg)
    return kd.view(lead), (ce.view(lead) if with_ce else None)


class _FusedLinearKD(torch.autograd.Function):
    """Forward: losses and precomputed gradients; backward: scale + per-token corrections."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, weights, cfg: _FusedConfig):
        ctx.set_materialize_grads(False)  # an unused CE output gets None, not zeros
        # No gradient work in evaluation (no_grad), where needs_input_grad still says True.
        want_h = cfg.grad_enabled and ctx.needs_input_grad[0]
        want_w = cfg.grad_enabled and ctx.needs_input_grad[1]
        n = h_s.shape[0]
        per_token = torch.empty(5, n, dtype=torch.float32, device=h_s.device)  # lse_s, lse_t, kl, lse_ce, ce
        grad_h = torch.zeros(n, h_s.shape[1], dtype=torch.float32, device=h_s.device) if want_h else None
        grad_w = torch.empty_like(w_s, dtype=_acc_dtype(w_s)) if want_w else None  # the first chunk writes it
        written = False  # grad_w: the first chunk with a gradient writes it
        slices = _token_slices(n, cfg.chunk_tokens)
        # One host read for all chunks, not one per chunk: a fully masked chunk gets losses only.
        with_grad = _weighted_chunks(weights, slices, cfg) if want_h or want_w else [False] * len(slices)
        for rows, want_grad in zip(slices, with_grad):
            s, t = _chunk_logits(h_s, w_s, h_t, w_t, rows)
            per_token[:, rows], g = _forward_chunk(s, t, labels[rows], weights[rows], cfg, want_grad)
            if g is not None:
                _accumulate(g, h_s, w_s, rows, grad_h, grad_w, first=not written)
                written = True
            del s, t, g  # before the next chunk's matmuls: one chunk's buffers alive at a time
        if grad_w is not None and not written:
            grad_w.zero_()
        ctx.save_for_backward(h_s, w_s, h_t, w_t, labels, weights, per_token)
        ctx.cfg, ctx.grad_h, ctx.grad_w = cfg, grad_h, grad_w
        kd = per_token[2] * cfg.temperature**2
        ce = per_token[4].clone() if cfg.with_ce else per_token.new_zeros(0)
        return kd, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kd, grad_ce):
        h_s, w_s, h_t, w_t, labels, weights, per_token = ctx.saved_tensors
        cfg, grad_h, grad_w = ctx.cfg, ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None  # once_differentiable: free them with the graph
        g_kd = _upstream(grad_kd, h_s.shape[0], h_s.device)
        g_ce = _upstream(grad_ce if cfg.with_ce else None, h_s.shape[0], h_s.device)
        lam = _most_common(g_kd / weights, weights != 0)  # on the device: no host read
        d_kd, d_ce = g_kd - lam * weights, g_ce - lam * cfg.ce_weight * weights  # what the sums missed
        if grad_h is not None:
            grad_h.mul_(lam)
        if grad_w is not None:
            grad_w.mul_(lam)
        # d_ce is all 0 without a CE upstream and ce_weight: their corrections skip the CE terms.
        ce_terms = cfg.with_ce and (grad_ce is not None or cfg.ce_weight != 0)
        need = (d_kd != 0) | (d_ce != 0)  # [tokens]: to recompute
        n_fix = need.sum().tolist()  # backward's one host read (none per chunk)
        if n_fix:  # their ids in increasing order, as torch.nonzero would give (without its host read)
            fix = torch.argsort(need.logical_not().to(torch.uint8), stable=True)[:n_fix]
            for part in _token_slices(n_fix, cfg.chunk_tokens):
                rows = fix[part]
                s, t = _chunk_logits(h_s, w_s, h_t, w_t, rows)
                g = _recomputed_grad(s, t, labels[rows], per_token[:, rows], d_kd[rows], d_ce[rows], cfg, ce_terms)
                _accumulate(g, h_s, w_s, rows, grad_h, grad_w)
                del s, t, g
        out_h = grad_h.to(h_s.dtype) if grad_h is not None else None  # [tokens, h_s]
        if out_h is not None and cfg.layout.tp_size > 1:
            # Each rank's sum covers its vocab slice only: d loss / d h_s is their sum. Reduced in
            # the activations' dtype, as Megatron's ColumnParallelLinear reduces its input gradient
            # (a float32 reduce would move twice the bytes of a bf16 model's).
            dist.all_reduce(out_h, op=dist.ReduceOp.SUM, group=cfg.tp_group)
        out_w = grad_w.to(w_s.dtype) if grad_w is not None else None
        return out_h, out_w, None, None, None, None, None


def _weighted_chunks(weights: torch.Tensor, slices, cfg: _FusedConfig) -> List[bool]:
    """For each chunk of `slices` (consecutive, `cfg.chunk_tokens` each, the last maybe
    shorter): does it hold a token of nonzero weight? One host read for all chunks (a
    per-chunk `bool(...)` would stop the host once per chunk on a GPU); none without
    token weights, which are then all 1."""
    if not cfg.weighted:
        return [True] * len(slices)
    size = len(slices) * cfg.chunk_tokens
    on = torch.zeros(size, dtype=torch.bool, device=weights.device)  # padded to whole chunks
    on[: weights.shape[0]] = weights != 0
    return on.view(len(slices), cfg.chunk_tokens).any(dim=1).tolist()


def _chunk_logits(h_s, w_s, h_t, w_t, rows):
    """Both output layers on one chunk of tokens, in the models' dtype (as Megatron's).

    Returns [chunk, V_s/tp] and [chunk, n_valid] (the teacher at the student's true-vocab
    ids). On CPU they are transposes of contiguous [V/tp, chunk] products (vocab-major):
    MKL's sgemm streams the [V/tp, h] weight far faster as W h^T than as h W^T at small
    chunks (measured at V/tp 262144, h 4096, 128 tokens: 121 vs 80 GFLOP/s on this
    project's 2-core machine; at 1024 tokens the two meet). The chunk math below is
    layout-agnostic: every buffer derived from these keeps their strides.
    """
    if _vocab_major(h_s.device):
        return torch.mm(w_s, h_s[rows].t()).t(), torch.mm(w_t, h_t[rows].t()).t()
    return h_s[rows] @ w_s.t(), h_t[rows] @ w_t.t()


def _vocab_major(device: torch.device) -> bool:
    """CPU: vocab-major logits (see `_chunk_logits`). CUDA: token-major, so that the
    per-token reductions run over a contiguous dimension; cuBLAS takes either layout."""
    return device.type == "cpu"


def _forward_chunk(s, t, labels, coef, cfg: _FusedConfig, want_grad: bool):
    """Losses of one chunk and, if `want_grad`, G = d(coef * (KD + ce_weight * CE))/d s.

    s: [chunk, V_s/tp], t: [chunk, n_valid] logits, consumed: their float32 buffers are
    reused in place, so a chunk holds two [chunk, V/tp] float32 buffers and one small
    [chunk, block] scratch (see `_scratch_for`).
    Returns ([5, chunk] float32 lse_s, lse_t, KL, lse_ce, CE; G float32 [chunk, V_s/tp] or None).
    """
    s, t = s.float(), t.float()  # [chunk, V_s/tp], [chunk, n_valid]; no copy when already float32
    scratch = _scratch_for(s)
    ce_apart = cfg.with_ce and cfg.temperature != 1.0  # at T=1 the CE reuses the KD's exponentials
    ce_stats = ce_local_stats(s, labels, cfg.layout.student_start, scratch) if ce_apart else None
    label_logit = _label_logit(s, labels, cfg) if cfg.with_ce and not ce_apart else None
    _scale_kd_columns(s, t, cfg)
    kd_stats, other = _kd_partials(s[:, : cfg.layout.n_valid], t, cfg.reverse, scratch)
    if label_logit is not None:
        ce_stats = _ce_partials_t1(s, cfg.layout.n_valid, kd_stats, label_logit, cfg.reverse)
    per_token = _reduce_chunk(kd_stats, ce_stats, cfg)
    if not want_grad:
        return per_token, None
    # A chunk with a gradient holds a token of nonzero weight: its CE part is nonzero iff ce_weight is.
    return per_token, _grad_in_place(s, other, labels, per_token, kd_stats, coef, coef * cfg.ce_weight, cfg,
                                     scratch, ce_grad=cfg.with_ce and cfg.ce_weight != 0)


def _recomputed_grad(s, t, labels, per_token, coef_kd, coef_ce, cfg: _FusedConfig, ce_terms: bool = True):
    """Backward's correction for some tokens: d(sum coef_kd * KD + coef_ce * CE)/d s from
    their recomputed logits and the per-token results of forward (no TP communication:
    the local maxima need not match forward's). Float32 [chunk, V_s/tp], over `s`.
    `ce_terms` false: coef_ce is known to be all 0."""
    s, t = s.float(), t.float()
    scratch = _scratch_for(s)
    _scale_kd_columns(s, t, cfg)
    kd_stats, other = _kd_partials(s[:, : cfg.layout.n_valid], t, cfg.reverse, scratch)
    # CE terms unless known (on the host) to be 0: where coef_ce is 0 they add exact zeros, and
    # asking the device whether any is nonzero would cost a host read per chunk.
    return _grad_in_place(s, other, labels, per_token, kd_stats, coef_kd, coef_ce, cfg, scratch,
                          ce_grad=cfg.with_ce and ce_terms)


def _scale_kd_columns(s, t, cfg: _FusedConfig) -> None:
    """The KD columns divided by T, in place: s[:, :n_valid] holds s/T and t holds t/T;
    s's padding columns stay unscaled (they only enter the CE)."""
    if cfg.temperature != 1.0:
        s[:, : cfg.layout.n_valid].mul_(1.0 / cfg.temperature)
        t.mul_(1.0 / cfg.temperature)


def _block_elements(device: torch.device) -> int:
    """Scratch for the vocab-blocked passes, in float32 elements. CPU: 4 MiB, so a block
    stays in cache (at 256 tokens, 4096 ids: 64 blocks of a 262144 vocab). CUDA: 64 MiB,
    so that a chunk is a few blocks, not hundreds of small kernel launches (not measured:
    no GPU has run this yet)."""
    return 1 << 20 if device.type == "cpu" else 1 << 24


def _scratch_for(s: torch.Tensor) -> torch.Tensor:
    """A float32 [chunk, block] buffer with s's layout (a block of s's columns, empty; s has
    at least one column, the teacher's slice may have none on a rank of padding ids only)."""
    block = max(1, min(s.shape[1], _block_elements(s.device) // max(s.shape[0], 1)))
    return torch.empty_like(s[:, :block])


def _kd_partials(s_valid, t, reverse: bool, scratch):
    """Local KD partials [5, chunk] (as `TorchChunkMath.local_stats`), turning the two
    buffers into what the gradient needs:

        s_valid (s/T)  ->  e_s = e^(s/T - m_s)
        t (t/T)        ->  forward KL: e_t = e^(t/T - m_t);  reverse KL: u = e_s (s - t)/T

    e_t's normaliser (and, in forward KL, the row sums of e_t (t - s)/T) are taken a vocab
    block at a time through `scratch`, so no third [chunk, n_valid] buffer exists.
    All float32 [chunk, n_valid], in place, in t's layout.
    """
    if s_valid.shape[1] == 0:  # this rank holds only padding ids
        stats = torch.zeros(5, s_valid.shape[0], dtype=torch.float32, device=s_valid.device)
        stats[:2] = float("-inf")
        return stats, t
    m_s, m_t = s_valid.amax(dim=-1), t.amax(dim=-1)
    z_t = torch.zeros_like(m_t)
    w = torch.zeros_like(m_t)  # forward KL: sum e_t (t - s)
    for cols, e in vocab_blocks(t.shape[1], scratch):
        t_b = t[:, cols]
        z_t += torch.sub(t_b, m_t[:, None], out=e).exp_().sum(dim=-1)  # e = e^(t - m_t) of the block
        t_b.sub_(s_valid[:, cols])  # t - s
        if reverse:
            t_b.neg_()  # s - t: u's second factor
        else:
            w += torch.mul(t_b, e, out=t_b).sum(dim=-1)
            t_b.copy_(e)  # e_t
    e_s = s_valid.sub_(m_s[:, None]).exp_()
    z_s = e_s.sum(dim=-1)
    if reverse:  # x = s, y = t
        w = t.mul_(e_s).sum(dim=-1)  # t holds u now
        return torch.stack([m_s, m_t, z_s, z_t, w]), t
    return torch.stack([m_t, m_s, z_t, z_s, w]), t  # x = t, y = s


def _label_logit(s, labels, cfg: _FusedConfig):
    """The label's logit where this rank owns it, else 0: [chunk]."""
    index, owned = _local_labels(labels, cfg.layout.student_start, s.shape[1])
    return s.gather(1, index[:, None]).squeeze(1) * owned


def _ce_partials_t1(s, n_valid, kd_stats, label_logit, reverse: bool):
    """Local CE partials [3, chunk] (max, sum-exp, label logit) at T=1 from the KD's student
    partials over the true vocab plus this rank's padding columns (a few)."""
    m_s, z_s = (kd_stats[0], kd_stats[2]) if reverse else (kd_stats[1], kd_stats[3])
    pad = s[:, n_valid:]  # [chunk, padding ids here]
    if pad.shape[1] == 0:
        return torch.stack([m_s, z_s, label_logit])
    m_pad = pad.amax(dim=-1)
    m = torch.maximum(m_s, m_pad)
    z = z_s * torch.exp(m_s - m) + torch.exp(pad - m[:, None]).sum(dim=-1)
    return torch.stack([m, z, label_logit])


def _reduce_chunk(kd_stats, ce_stats, cfg: _FusedConfig) -> torch.Tensor:
    """All-reduce one chunk's local partials over TP (one MAX, one SUM):
    [5, chunk] float32 lse_s, lse_t (KD, at T), KL, lse_ce, CE."""
    if ce_stats is None:  # no labels: lse_ce and CE come out as -inf, unused
        ce_stats = torch.zeros(3, kd_stats.shape[1], dtype=torch.float32, device=kd_stats.device)
    m_local = torch.cat([kd_stats[:2], ce_stats[:1]])  # [3, chunk]: max x, max y, max s (T=1)
    m = m_local.clone()
    if cfg.layout.tp_size > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=cfg.tp_group)
    rescale = torch.exp(m_local - m)  # a rank with no valid ids: exp(-inf) = 0
    sums = torch.stack([kd_stats[2] * rescale[0], kd_stats[3] * rescale[1], kd_stats[4] * rescale[0],
                        ce_stats[1] * rescale[2], ce_stats[2]])  # [5, chunk]; the label logit is on one rank
    if cfg.layout.tp_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=cfg.tp_group)
    lse_x, lse_y, kl = global_kl(m[:2], sums[:3])
    lse_s, lse_t = (lse_x, lse_y) if cfg.reverse else (lse_y, lse_x)
    lse_ce = m[2] + torch.log(sums[3])
    return torch.stack([lse_s, lse_t, kl, lse_ce, lse_ce - sums[4]])


def _grad_in_place(s, other, labels, per_token, kd_stats, coef_kd, coef_ce, cfg: _FusedConfig, scratch,
                   ce_grad: bool):
    """G = d(coef_kd * KD + coef_ce * CE)/d s, written over `s` (float32 [chunk, V_s/tp]).
    `ce_grad` false: coef_ce is known (on the host) to be all 0, so the CE terms are skipped.

    s[:, :n_valid] holds e_s and `other` e_t or u (`_kd_partials`); s's padding columns
    the unscaled logits. With q = softmax(s/T) = e_s e^(m_s - lse_s), p = e_t e^(m_t - lse_t):
    forward KL: T (q - p) = a e_s - b e_t; reverse KL: T q (log q - log p - KL), where
    log q - log p = (s - t)/T - lse_s + lse_t, so it is a u - a c e_s for
    c = lse_s - lse_t + KL. CE: softmax(s) - onehot(label); on the true vocab
    softmax(s) = e_s^T e^(T m_s - lse_ce), which at T=1 only changes e_s's factor.
    """
    n, temp = cfg.layout.n_valid, cfg.temperature
    lse_s, lse_t, kl, lse_ce = per_token[0], per_token[1], per_token[2], per_token[3]
    m_s, m_t = (kd_stats[0], kd_stats[1]) if cfg.reverse else (kd_stats[1], kd_stats[0])
    e_s = s[:, :n]  # [chunk, n_valid]
    if n > 0:
        a = temp * coef_kd * torch.exp(m_s - lse_s)  # [chunk]
        factor = -a * (lse_s - lse_t + kl) if cfg.reverse else a.clone()  # e_s's factor
        ce_factor = coef_ce * torch.exp(temp * m_s - lse_ce) if ce_grad else None  # e_s^T's
        if ce_grad and temp != 1.0:  # e_s factor + e_s^T ce_factor, a vocab block at a time
            for cols, p in vocab_blocks(n, scratch):
                e_b = e_s[:, cols]
                p = torch.pow(e_b, temp, out=p).mul_(ce_factor[:, None])
                e_b.mul_(factor[:, None]).add_(p)
        else:
            e_s.mul_((factor + ce_factor if ce_grad else factor)[:, None])
        if cfg.reverse:  # + a u
            e_s.add_(other.mul_(a[:, None]))
        else:  # - b e_t
            e_s.sub_(other.mul_((temp * coef_kd * torch.exp(m_t - lse_t))[:, None]))
    pad = s[:, n:]  # padding ids: no KD gradient; CE over the padded vocab, at T=1 (unscaled)
    if ce_grad and pad.shape[1] > 0:
        pad.sub_(lse_ce[:, None]).exp_().mul_(coef_ce[:, None])
    else:
        pad.zero_()
    if ce_grad:
        index, owned = _local_labels(labels, cfg.layout.student_start, s.shape[1])
        s.scatter_add_(1, index[:, None], (-coef_ce * owned)[:, None])
    return s


def _accumulate(g, h_s, w_s, rows, grad_h, grad_w, first: bool = False) -> None:
    """grad_h[rows] += g W_s (this rank's partial), grad_w += g^T h_s[rows] (= when `first`)."""
    g = g.to(w_s.dtype)  # [chunk, V_s/tp]; matmuls in the model's dtype, as Megatron's backward
    if grad_h is not None:
        # A vocab-major chunk (see `_chunk_logits`) as W^T G^T: measured 138 vs 108 GFLOP/s for G W.
        dh = torch.mm(w_s.t(), g.t()).t() if g.t().is_contiguous() else g @ w_s  # [chunk, h_s]
        grad_h[rows] += dh.float()
    if grad_w is not None:
        g_t, h = g.t().to(grad_w.dtype), h_s[rows].to(grad_w.dtype)
        if first:  # saves a pass over the whole [V/tp, h] gradient to zero it
            torch.mm(g_t, h, out=grad_w)  # [V_s/tp, h_s]
        else:
            grad_w.addmm_(g_t, h)


def _acc_dtype(w: torch.Tensor) -> torch.dtype:
    # float32 weights accumulate exactly in float32. bf16/fp16 ones accumulate in their
    # dtype (one rounding per chunk, as Megatron's per-microbatch wgrad): a float32
    # [V/tp, h] accumulator would double the largest buffer of this loss.
    return w.dtype


def _upstream(grad: Optional[torch.Tensor], n: int, device) -> torch.Tensor:
    if grad is None:
        return torch.zeros(n, dtype=torch.float32, device=device)
    return grad.reshape(-1).float()


def _most_common(values: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """The most frequent of values[on] (the smallest of equally frequent ones; 0 when no entry
    is on), a 0-dim tensor: the scale the precomputed sums get. The value of
    `torch.unique(values[on], return_counts=True)`'s most counted entry, in fixed-size ops:
    `values[on]` and `torch.unique` have data-dependent sizes, which the host must read."""
    if values.numel() == 0:
        return values.new_zeros(())
    keyed = torch.where(on, values, torch.full_like(values, float("inf")))  # off entries: counted 0
    ordered, order = torch.sort(keyed)  # [n]
    new_run = torch.ones_like(on)
    new_run[1:] = ordered[1:] != ordered[:-1]
    run = torch.cumsum(new_run, dim=0) - 1  # [n] run id of each sorted entry, runs in increasing value
    counts = torch.zeros_like(run).scatter_add_(0, run, on[order].long())  # [n] entries on per run
    best = counts.argmax()  # the first of the most counted: the smallest value
    value = ordered[(run == best).int().argmax()]  # the run's first entry
    return torch.where(counts[best] > 0, value, torch.zeros_like(value))


# --------------------------------------------------------------- teacher rows at mismatched padding


def _teacher_rows(teacher_weight, layout: VocabLayout, group, cache: Optional[dict]) -> torch.Tensor:
    """The teacher's weight rows for this rank's student true-vocab ids: [n_valid, h_t]."""
    if layout.aligned:
        return teacher_weight[: layout.n_valid]  # a view: same ids, same rank
    key = (teacher_weight.data_ptr(), teacher_weight._version, layout)
    # Ranks must agree, or one would broadcast while another waits. They do without asking
    # each other (a host read per microbatch): every rank calls with the same arguments, and
    # its teacher shard is loaded, moved or cast when the others' are, which is when the key
    # changes (data_ptr, version); the cache is the caller's, kept as long on every rank.
    if cache is not None and cache.get("key") == key:
        return cache["rows"]
    rows = _fetch_teacher_rows(teacher_weight, layout, group)
    if cache is not None:
        cache.update(key=key, rows=rows)
    return rows


def _fetch_teacher_rows(teacher_weight, layout: VocabLayout, group) -> torch.Tensor:
    """Each rank broadcasts its teacher shard in turn; every rank keeps the rows it needs.

    Peak extra memory: one shard; traffic: the whole teacher output weight, once.
    """
    _, my_rank = _group_size_rank(group)
    lo, n = layout.student_start, layout.n_valid
    out = teacher_weight.new_empty(n, teacher_weight.shape[1])  # [n_valid, h_t]
    for rank, start in enumerate(layout.teacher_starts):
        shard = teacher_weight.contiguous() if rank == my_rank else torch.empty_like(teacher_weight)
        dist.broadcast(shard, src=dist.get_global_rank(group, rank), group=group)
        a, b = max(lo, start), min(lo + n, start + layout.teacher_local)
        if a < b:
            out[a - lo : b - lo] = shard[a - start : b - start]
    return out


def _check_args(h_s, w_s, h_t, w_t, labels, kind, temperature, token_weights) -> None:
    if kind not in KINDS:
        raise ValueError(f"fused_linear_kd_loss: kind={kind!r} is not allowed; use one of {KINDS}")
    if not temperature > 0:
        raise ValueError(f"fused_linear_kd_loss: temperature must be > 0, got {temperature}")
    if h_s.shape[:-1] != h_t.shape[:-1]:
        raise ValueError(f"fused_linear_kd_loss: student hidden {tuple(h_s.shape)} and teacher hidden "
                         f"{tuple(h_t.shape)} must share leading (token) dims")
    if w_s.shape[1] != h_s.shape[-1] or w_t.shape[1] != h_t.shape[-1]:
        raise ValueError(f"fused_linear_kd_loss: output weights {tuple(w_s.shape)}, {tuple(w_t.shape)} do not "
                         f"match hidden sizes {h_s.shape[-1]}, {h_t.shape[-1]}")
    if labels is not None and labels.shape != h_s.shape[:-1]:
        raise ValueError(f"fused_linear_kd_loss: labels {tuple(labels.shape)} must have the hidden "
                         f"states' leading dims {tuple(h_s.shape[:-1])}")
    if token_weights is not None and token_weights.shape != h_s.shape[:-1]:
        raise ValueError(f"fused_linear_kd_loss: token_weights {tuple(token_weights.shape)} must have the hidden "
                         f"states' leading dims {tuple(h_s.shape[:-1])}")
