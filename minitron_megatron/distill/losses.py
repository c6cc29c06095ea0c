"""Knowledge-distillation logit loss on Megatron's vocab-parallel logits.

Each TP rank holds logits for a contiguous slice of the padded vocabulary,
`[..., vocab_padded/tp]`. The loss is the per-token KL divergence between the
teacher's and the student's softmax over the *true* vocabulary `[0, true_vocab_size)`
(padding ids are excluded from both distributions), computed without ever
gathering the vocab dimension when the two slices line up:

    x, y   = the two logit rows, divided by the temperature T
    stats  = per rank: max(x), max(y), sum e^(x - max x), sum e^(y - max y),
             w = sum e^(x - max x) (x - y)                       # one pass, float32
    reduce = all_reduce MAX of the maxima, rescale, all_reduce SUM   # [5, tokens] only
    KL(softmax x || softmax y) = w / z_x - lse(x) + lse(y)

forward_kl = KL(teacher || student) (x = teacher), reverse_kl = KL(student || teacher).
The loss returned is T^2 * KL (Hinton et al.'s scaling: it keeps gradient
magnitudes independent of T, so a T sweep needs no learning-rate change).

Memory: a custom autograd Function saves only the inputs and three float32
scalars per token (lse of student and teacher, KL); forward and backward loop
over chunks of tokens so at most one chunk's float32 probabilities exist at a time.
`impl="triton"` swaps the per-chunk math for fused kernels (`kd_triton.py`).

`vocab_parallel_ce_loss` is the student's own cross entropy on the same sharded
logits, chunked the same way (no float32 copy of the whole shard), with the TP
group passed explicitly. `fused_linear.py` computes both losses from hidden states
and output weights, so that no logits tensor exists whole (`kd_impl="fused_linear"`).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

KINDS = ("forward_kl", "reverse_kl")
LOGIT_IMPLS = ("torch", "triton")
"""Implementations of `kd_logit_loss` (the per-chunk math on given logits)."""
IMPLS = LOGIT_IMPLS + ("fused_linear",)
"""`distill.kd_impl` values: the logit impls, or the fused output-layer + loss (`fused_linear.py`)."""
_CHUNK_ELEMENTS = 1 << 24  # default chunk: ~64 MiB per float32 temporary


@dataclass(frozen=True)
class VocabLayout:
    """Where this rank's student and teacher slices sit in the padded vocabulary.

    `aligned` is the same on every rank: True when every rank's teacher slice holds
    exactly the true-vocab ids of its student slice (then no communication of
    logits is needed); False makes the loss redistribute the teacher per chunk.
    """

    tp_size: int
    student_start: int
    student_local: int
    teacher_start: int
    teacher_local: int
    true_vocab_size: int
    teacher_starts: tuple  # every rank's teacher_start, in TP-rank order
    aligned: bool

    @property
    def n_valid(self) -> int:
        """Student columns on this rank whose vocab id is < true_vocab_size (a prefix)."""
        return _valid_count(self.student_start, self.student_local, self.true_vocab_size)


@dataclass(frozen=True)
class _KDConfig:
    tp_group: Optional[dist.ProcessGroup]
    layout: VocabLayout
    reverse: bool
    temperature: float
    chunk_tokens: int
    impl: str


def kd_logit_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group: Optional[dist.ProcessGroup],
    true_vocab_size: int,
    student_vocab_start: Optional[int] = None,
    teacher_vocab_start: Optional[int] = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
    impl: str = "torch",
) -> torch.Tensor:
    """Per-token KD loss T^2 * KL on vocab-parallel logits; float32, shape = leading dims.

    student_logits: [..., student_vocab_padded/tp], this rank's slice (requires grad).
    teacher_logits: [..., teacher_vocab_padded/tp], same leading dims; gets no grad.
    tp_group: the tensor-parallel group (None: no TP, the slices are the full vocab).
    true_vocab_size: ids >= this are padding and excluded from both distributions.
    *_vocab_start: first vocab id of this rank's slice (default tp_rank * local size).
    kind: "forward_kl" = KL(teacher || student), "reverse_kl" = KL(student || teacher).
    chunk_tokens: tokens per chunk, which bounds the float32 scratch of the torch path
        (3 x chunk x v/tp) and the gathered teacher chunk when slices do not line up.
        Default: 2^24 / (v_s/tp) tokens (64 MiB per float32 buffer), at most 4096;
        for impl="triton" with aligned slices, all tokens in one launch.
    impl: "torch" or "triton" (fused kernels; CPU tensors need TRITON_INTERPRET=1
        set before triton is first imported).
    All TP ranks must call this with the same token count and arguments.
    """
    _check_args(student_logits, teacher_logits, kind, impl, temperature, chunk_tokens)
    lead_shape = student_logits.shape[:-1]
    student_2d = student_logits.reshape(-1, student_logits.shape[-1])  # [tokens, v_s/tp]
    teacher_2d = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])  # [tokens, v_t/tp]
    layout = resolve_layout(
        tp_group, student_2d.shape, teacher_2d.shape, true_vocab_size,
        student_vocab_start, teacher_vocab_start, student_logits.device,
    )
    cfg = _KDConfig(
        tp_group=tp_group, layout=layout, reverse=kind == "reverse_kl",
        temperature=float(temperature), impl=impl,
        chunk_tokens=chunk_tokens or _default_chunk_tokens(layout, impl, student_2d.shape[0]),
    )
    loss = _KDLogitLoss.apply(student_2d, teacher_2d, cfg)  # [tokens]
    return loss.view(lead_shape)


def vocab_parallel_ce_loss(student_logits: torch.Tensor, labels: torch.Tensor, *,
                           tp_group: Optional[dist.ProcessGroup], vocab_start: Optional[int] = None,
                           chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-token cross entropy on vocab-parallel logits; float32, shape of `labels`.

    Normalises over the whole *padded* vocabulary, as Megatron's LM loss
    (`vocab_parallel_cross_entropy`) does, so the value is comparable with `train`
    and `evaluate`. Unlike Megatron's function it never copies the whole
    `[tokens, v/tp]` shard to float32 (chunks of `chunk_tokens`, default as for
    `kd_logit_loss`), never modifies the logits, and takes the TP group explicitly.
    student_logits: [..., v/tp] (gets a gradient when it requires one); labels: [...]
    global vocab ids; vocab_start: first id of this rank's slice (default tp_rank * v/tp).
    """
    v_local = student_logits.shape[-1]
    tp_size, tp_rank = _group_size_rank(tp_group)
    start = tp_rank * v_local if vocab_start is None else int(vocab_start)
    chunk = chunk_tokens or max(1, min(4096, _CHUNK_ELEMENTS // max(v_local, 1)))
    logits_2d = student_logits.reshape(-1, v_local)  # [tokens, v/tp]
    loss = _VocabParallelCE.apply(logits_2d, labels.reshape(-1), tp_group, tp_size, start, chunk)
    return loss.view(labels.shape)


class _VocabParallelCE(torch.autograd.Function):
    """Saves the logits (no copy) and one float32 lse per token; backward recomputes per chunk."""

    @staticmethod
    def forward(ctx, logits, labels, group, tp_size, start, chunk):
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        label_logit = torch.empty_like(lse)
        for rows in _token_slices(logits.shape[0], chunk):
            stats = ce_local_stats(logits[rows], labels[rows], start)  # [3, chunk]
            m = stats[0].clone()
            if tp_size > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            sums = torch.stack([stats[1] * torch.exp(stats[0] - m), stats[2]])  # [2, chunk]
            if tp_size > 1:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            lse[rows] = m + torch.log(sums[0])
            label_logit[rows] = sums[1]
        ctx.save_for_backward(logits, labels, lse)
        ctx.start, ctx.chunk = start, chunk
        return lse - label_logit

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)  # [tokens, v/tp]
        scale = grad_loss.float()
        in_place = grad.dtype == torch.float32  # else a float32 chunk, then one cast
        for rows in _token_slices(logits.shape[0], ctx.chunk):
            g = grad[rows].zero_() if in_place else torch.zeros(grad[rows].shape, device=grad.device)
            add_ce_grad(g, logits[rows], labels[rows], ctx.start, lse[rows], scale[rows])
            if not in_place:
                grad[rows] = g
        return grad, None, None, None, None, None


def ce_local_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                   scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 [3, chunk]: local max, sum e^(logit - max), and the label's logit (0 where
    another rank owns the label) over all local columns of `logits` [chunk, v/tp].

    scratch: a float32 [chunk, block] buffer; the exponentials then go a vocab block at a
    time through it instead of through one [chunk, v/tp] temporary."""
    x = logits.float()  # [chunk, v/tp]; the tensor itself when already float32 (read only)
    m = x.amax(dim=-1)
    z = torch.zeros_like(m)
    for cols, e in vocab_blocks(x.shape[1], torch.empty_like(x) if scratch is None else scratch):
        z += torch.sub(x[:, cols], m[:, None], out=e).exp_().sum(dim=-1)
    index, owned = _local_labels(labels, vocab_start, x.shape[1])
    label_logit = x.gather(1, index[:, None]).squeeze(1) * owned
    return torch.stack([m, z, label_logit])


def vocab_blocks(n: int, scratch: torch.Tensor):
    """(columns, scratch view) for consecutive blocks of n vocab columns, each as wide as
    `scratch` ([chunk, block], block >= 1) allows; the last one may be narrower."""
    step = scratch.shape[1]
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield slice(start, stop), scratch[:, : stop - start]


def add_ce_grad(out: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                lse: torch.Tensor, scale: torch.Tensor) -> None:
    """out += scale * (softmax(logits) - onehot(label)) for one chunk; out: float32 [chunk, v/tp]."""
    out.add_(torch.exp(logits.float() - lse[:, None]).mul_(scale[:, None]))
    index, owned = _local_labels(labels, vocab_start, out.shape[1])
    out.scatter_add_(1, index[:, None], (-scale * owned)[:, None])


def _local_labels(labels: torch.Tensor, vocab_start: int, v_local: int):
    """(column index clamped into this slice, float 1/0: this rank owns the label)."""
    local = labels.long() - vocab_start
    owned = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), owned.float()


class _KDLogitLoss(torch.autograd.Function):
    """Saves the inputs and 3 float32 scalars per token; backward recomputes per chunk."""

    @staticmethod
    def forward(ctx, student, teacher, cfg: _KDConfig):
        impl = _impl(cfg.impl)
        chunks = _chunks(cfg, student)
        stats = torch.cat([_chunk_stats(student, teacher, rows, cfg, impl) for rows in chunks], dim=1)
        lse_x, lse_y, kl = _reduce_stats(stats, cfg.tp_group, cfg.layout.tp_size)  # [tokens] each
        lse_s, lse_t = (lse_x, lse_y) if cfg.reverse else (lse_y, lse_x)
        ctx.save_for_backward(student, teacher, lse_s, lse_t, kl)
        ctx.cfg = cfg
        return kl * cfg.temperature**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, lse_s, lse_t, kl = ctx.saved_tensors
        cfg = ctx.cfg
        n_valid = cfg.layout.n_valid
        # d(T^2 KL)/d s = T^2 * dKL/d(s/T) / T = T * dKL/d(s/T)
        scale = grad_loss.float().contiguous() * cfg.temperature  # [tokens]
        grad = torch.empty_like(student)  # [tokens, v_s/tp]
        grad[:, n_valid:].zero_()  # padding ids are outside both distributions
        impl = _impl(cfg.impl)
        for rows in _chunks(cfg, student):
            impl.student_grad(
                student[rows, :n_valid], _teacher_chunk(teacher, rows, cfg),
                lse_s[rows], lse_t[rows], kl[rows], scale[rows],
                1.0 / cfg.temperature, cfg.reverse, out=grad[rows, :n_valid],
            )
        return grad, None, None


def _chunk_stats(student, teacher, rows, cfg: _KDConfig, impl) -> torch.Tensor:
    """[5, chunk] local partials (see `TorchChunkMath.local_stats`) of one chunk of tokens."""
    s = student[rows, : cfg.layout.n_valid]  # [chunk, n_valid]
    t = _teacher_chunk(teacher, rows, cfg)  # [chunk, n_valid], same vocab ids as s
    x, y = (s, t) if cfg.reverse else (t, s)
    return impl.local_stats(x, y, 1.0 / cfg.temperature)


def _reduce_stats(stats: torch.Tensor, group, tp_size: int):
    """Combine per-rank partials [5, tokens] into global lse(x), lse(y), KL(x || y)."""
    m_local, (z_x, z_y, w) = stats[:2], stats[2:]
    m = m_local.clone()  # [2, tokens]: max of x, max of y
    if tp_size > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # A rank with no valid ids has m_local = -inf: its sums are 0 and rescale to 0.
    rescale = torch.exp(m_local - m)
    sums = torch.stack([z_x * rescale[0], z_y * rescale[1], w * rescale[0]])  # [3, tokens]
    if tp_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return global_kl(m, sums)


def global_kl(m: torch.Tensor, sums: torch.Tensor):
    """lse(x), lse(y), KL(x || y) from TP-reduced maxima m [2, tokens] and sums
    [z_x, z_y, w] [3, tokens] (each sum relative to the global max)."""
    z_x, z_y, w = sums
    log_z_x, log_z_y = torch.log(z_x), torch.log(z_y)
    # Differences of maxima and of log-sums first: exact zero when x == y.
    kl = w / z_x + (m[1] - m[0]) + (log_z_y - log_z_x)
    return m[0] + log_z_x, m[1] + log_z_y, kl


# ----------------------------------------------------------------- PyTorch per-chunk math


class TorchChunkMath:
    """Per-chunk math in plain PyTorch (the `impl="torch"` path).

    Float32 scratch buffers are allocated once per forward or backward call and
    reused by every chunk: on CPU, fresh 64 MiB temporaries per chunk cost page
    faults (measured 7.7 s -> 6.3 s for 512 tokens x 256k vocab, fwd+bwd).
    """

    def __init__(self):
        self._flat = None  # float32 scratch, grown on demand

    def _scratch(self, count: int, like: torch.Tensor):
        """`count` float32 [chunk, n] buffers (contents undefined)."""
        numel = like.shape[0] * like.shape[1]
        if self._flat is None or self._flat.numel() < count * numel:
            self._flat = torch.empty(count * numel, dtype=torch.float32, device=like.device)
        return [self._flat[i * numel : (i + 1) * numel].view(like.shape) for i in range(count)]

    def local_stats(self, x: torch.Tensor, y: torch.Tensor, inv_t: float) -> torch.Tensor:
        """Per-token partials of KL(softmax(x*inv_t) || softmax(y*inv_t)) over local columns.

        x, y: [chunk, n] (any float dtype). Returns float32 [5, chunk]: max x', max y',
        sum e^(x' - max x'), sum e^(y' - max y'), sum e^(x' - max x') (x' - y'),
        where x' = x * inv_t. Scratch: three float32 [chunk, n] buffers.
        """
        if x.shape[1] == 0:  # this rank holds only padding ids
            out = torch.zeros(5, x.shape[0], dtype=torch.float32, device=x.device)
            out[:2] = float("-inf")
            return out
        xs, ys, buf = self._scratch(3, x)
        _scale_into(xs, x, inv_t)
        _scale_into(ys, y, inv_t)
        m_x, m_y = xs.amax(dim=-1), ys.amax(dim=-1)
        z_y = torch.sub(ys, m_y[:, None], out=buf).exp_().sum(dim=-1)
        diff = torch.sub(xs, ys, out=buf)  # e^(y - m) is consumed
        e_x = torch.sub(xs, m_x[:, None], out=ys).exp_()  # y is consumed
        z_x = e_x.sum(dim=-1)
        w = torch.bmm(e_x[:, None, :], diff[:, :, None]).view(-1)  # row-wise dot, no temporary
        return torch.stack([m_x, m_y, z_x, z_y, w])

    def student_grad(self, student, teacher, lse_s, lse_t, kl, scale, inv_t, reverse, out) -> None:
        """Write d loss / d student logits of one chunk into `out` ([chunk, n], student dtype).

        With q = softmax(s/T), p = softmax(t/T) and `scale` = upstream grad * T per token:
        forward KL: scale * (q - p); reverse KL: scale * q * (log q - log p - KL).
        """
        log_q, log_p = self._scratch(2, student)
        _scale_into(log_q, student, inv_t).sub_(lse_s[:, None])  # [chunk, n]
        _scale_into(log_p, teacher, inv_t).sub_(lse_t[:, None])
        if reverse:
            log_p.neg_().add_(log_q).sub_(kl[:, None])  # log q - log p - KL
            grad = log_q.exp_().mul_(log_p)
        else:
            grad = log_q.exp_().sub_(log_p.exp_())
        out.copy_(grad.mul_(scale[:, None]))


def _scale_into(out: torch.Tensor, t: torch.Tensor, inv_t: float) -> torch.Tensor:
    """out = float32(t) * inv_t."""
    out.copy_(t)
    return out if inv_t == 1.0 else out.mul_(inv_t)


def _impl(name: str):
    """Per-chunk math with `local_stats` and `student_grad`; one instance per call."""
    if name == "torch":
        return TorchChunkMath()
    from minitron_megatron.distill import kd_triton

    kd_triton.require_triton()
    return kd_triton


# ------------------------------------------------------------- vocab layout and chunks


_LAYOUTS: dict = {}
"""Resolved layouts by (tp size, tp rank, local slice sizes, true vocab): see `resolve_layout`."""
_MAX_LAYOUTS = 64


def resolve_layout(tp_group, student_shape, teacher_shape, true_vocab_size,
                   student_vocab_start=None, teacher_vocab_start=None,
                   device=torch.device("cpu")) -> VocabLayout:
    """Check both slicings cover the true vocab; decide, identically on every rank, if they align.

    One small all_gather (5 ints per rank) when TP > 1, and a host read of its result, the
    first time a layout is seen: with the default starts (tp_rank x local size) the layout is
    a function of the TP size and rank, both local slice sizes and the true vocab, so it is
    cached under them. Every rank calls with the same shapes, so all hit or all miss (the
    token counts are compared on that first call only). Explicit starts are gathered every call.
    """
    tp_size, tp_rank = _group_size_rank(tp_group)
    n_tokens, s_local = student_shape
    t_local = teacher_shape[1]
    key = None
    if student_vocab_start is None and teacher_vocab_start is None:
        key = (tp_size, tp_rank, s_local, t_local, int(true_vocab_size))
        if key in _LAYOUTS:
            return _LAYOUTS[key]
    s_start = tp_rank * s_local if student_vocab_start is None else int(student_vocab_start)
    t_start = tp_rank * t_local if teacher_vocab_start is None else int(teacher_vocab_start)
    mine = torch.tensor([n_tokens, s_start, s_local, t_start, t_local], dtype=torch.int64)
    table = _all_gather_ints(mine, tp_group, tp_size, device)  # [tp, 5]
    _check_table(table, true_vocab_size)
    aligned = all(_rank_aligned(row, true_vocab_size) for row in table.tolist())
    layout = VocabLayout(
        tp_size=tp_size, student_start=s_start, student_local=s_local, teacher_start=t_start,
        teacher_local=t_local, true_vocab_size=int(true_vocab_size),
        teacher_starts=tuple(table[:, 3].tolist()), aligned=aligned,
    )
    if key is not None:
        if len(_LAYOUTS) >= _MAX_LAYOUTS:  # the same on every rank: they see the same shapes
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
        _LAYOUTS[key] = layout
    return layout


def _rank_aligned(row, vocab: int) -> bool:
    _, s_start, s_local, t_start, t_local = row
    n = _valid_count(s_start, s_local, vocab)
    return n == 0 or (s_start == t_start and n == _valid_count(t_start, t_local, vocab))


def _check_table(table: torch.Tensor, vocab: int) -> None:
    """Fail with a clear message unless both slicings tile [0, true_vocab_size)."""
    if len(set(table[:, 0].tolist())) != 1:
        raise ValueError(f"kd_logit_loss: TP ranks hold different token counts {table[:, 0].tolist()}")
    for name, cols in (("student", (1, 2)), ("teacher", (3, 4))):
        covered = sorted((start, start + size) for start, size in table[:, cols].tolist())
        end = 0
        for lo, hi in covered:
            if lo > end:
                break
            end = max(end, hi)
        if end < vocab:
            raise ValueError(
                f"kd_logit_loss: the {name} slices {covered} do not cover vocab ids "
                f"[0, true_vocab_size={vocab}); check true_vocab_size and {name}_vocab_start"
            )
    if len(set(table[:, 4].tolist())) != 1:
        raise ValueError("kd_logit_loss: teacher slices differ in size across TP ranks")


def _teacher_chunk(teacher, rows, cfg: _KDConfig) -> torch.Tensor:
    """Teacher logits of this chunk at the student's true-vocab ids: [chunk, n_valid]."""
    layout = cfg.layout
    if layout.aligned:
        return teacher[rows, : layout.n_valid]
    return _redistribute_teacher(teacher[rows], layout, cfg.tp_group)


def _redistribute_teacher(teacher_rows, layout: VocabLayout, group) -> torch.Tensor:
    """Mismatched padding: all_gather one chunk of teacher rows and cut the student's ids.

    Cost: per chunk, every rank receives the whole teacher chunk ([chunk, v_t] in
    the teacher's dtype, (tp-1)/tp of it over the wire), once in forward and once
    in backward; peak extra memory is that one gathered chunk. Only used when
    student and teacher slices do not line up (different padded vocab sizes at TP > 1).
    """
    parts = [torch.empty_like(teacher_rows) for _ in range(layout.tp_size)]  # tp x [chunk, v_t/tp]
    dist.all_gather(parts, teacher_rows.contiguous(), group=group)
    lo, n = layout.student_start, layout.n_valid
    out = teacher_rows.new_empty(teacher_rows.shape[0], n)  # [chunk, n_valid]
    for start, part in zip(layout.teacher_starts, parts):
        a, b = max(lo, start), min(lo + n, start + layout.teacher_local)
        if a < b:
            out[:, a - lo : b - lo] = part[:, a - start : b - start]
    return out


def _chunks(cfg: _KDConfig, student: torch.Tensor):
    """Token slices; identical on every TP rank (same token count, same chunk size)."""
    return _token_slices(student.shape[0], cfg.chunk_tokens)


def _token_slices(n_tokens: int, chunk: int):
    if n_tokens == 0:
        return [slice(0, 0)]
    return [slice(i, min(i + chunk, n_tokens)) for i in range(0, n_tokens, chunk)]


def _default_chunk_tokens(layout: VocabLayout, impl: str, n_tokens: int) -> int:
    # The fused kernels keep nothing per chunk: one launch over all tokens, unless
    # the teacher must be gathered, which is bounded by the chunk size.
    if impl == "triton" and layout.aligned:
        return max(n_tokens, 1)
    return max(1, min(4096, _CHUNK_ELEMENTS // max(layout.student_local, 1)))


def _valid_count(start: int, local: int, vocab: int) -> int:
    return max(0, min(local, vocab - start))


def _group_size_rank(group):
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather_ints(mine: torch.Tensor, group, tp_size: int, device) -> torch.Tensor:
    if tp_size == 1:
        return mine[None]
    # On the logits' device, which is the device the TP group's backend serves.
    parts = [torch.empty_like(mine, device=device) for _ in range(tp_size)]
    dist.all_gather(parts, mine.to(device), group=group)
    return torch.stack(parts).cpu()


def _check_args(student, teacher, kind, impl, temperature, chunk_tokens) -> None:
    if kind not in KINDS:
        raise ValueError(f"kd_logit_loss: kind={kind!r} is not allowed; use one of {KINDS}")
    if impl not in LOGIT_IMPLS:
        raise ValueError(f"kd_logit_loss: impl={impl!r} is not allowed; use one of {LOGIT_IMPLS} "
                         "(fused_linear takes hidden states: fused_linear.fused_linear_kd_loss)")
    if not temperature > 0:
        raise ValueError(f"kd_logit_loss: temperature must be > 0, got {temperature}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"kd_logit_loss: chunk_tokens must be >= 1, got {chunk_tokens}")
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"kd_logit_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
            "logits must share leading (token) dims"
        )
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise ValueError("kd_logit_loss: logits must be floating point")
