"""Fused Triton kernels for the vocab-parallel KD logit loss (see `losses.py`).

Same math and same interface as `losses.TorchChunkMath`, the PyTorch per-chunk path:

- `local_stats(x, y, inv_t)`: one pass over each token's local vocab slice with an
  online softmax, emitting per-token partial sums `[m_x, m_y, z_x, z_y, w]` that
  `losses.py` then reduces across TP in PyTorch (all_reduce MAX, then SUM);
- `student_grad(...)`: a second pass that writes d loss / d student logits from
  the reduced per-token scalars. It is purely elementwise along the vocab, so it
  needs no reduction and no float32 copy of the logits ever exists in memory.

CUDA tensors run compiled kernels. CPU tensors run in Triton's interpreter, which
must be switched on with `TRITON_INTERPRET=1` *before triton is first imported*:
`triton.language` builds its own helpers (`tl.zeros`, `tl.max`, `tl.sum`) as
compiled or interpreted functions at import time, and `import megatron.core`
already imports triton. Setting the variable later leaves kernels that fail on
CPU tensors, so we check for it and say so.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # an optional accelerator: impl="torch" needs none of this
    triton = None
    tl = None

_BLOCK_V_GPU = 4096  # one row's vocab slice is streamed in blocks of this many ids
_BLOCK_V_CPU = 1024  # the interpreter pays per op, not per element: few, wide blocks


def require_triton() -> None:
    """Raise a clear error when Triton cannot be imported."""
    if triton is None:
        raise RuntimeError(
            "kd_logit_loss(impl='triton') needs the `triton` package, which is not "
            "importable here; `pip install triton`, or use impl='torch'. On CPU, "
            "Triton kernels run in its interpreter (TRITON_INTERPRET=1)."
        )


if triton is not None:  # kernels exist only where triton does; require_triton() guards callers

    @triton.jit
    def _kd_stats_kernel(
        x_ptr, y_ptr, out_ptr, n_tokens, n_valid, stride_x, stride_y, inv_t,
        BLOCK_V: tl.constexpr,
    ):
        """One program per token: online max / sum-exp of x and y, and w = sum e^(x-m_x) (x-y)."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        y_row = y_ptr + row * stride_y
        m_x = tl.full((), float("-inf"), tl.float32)
        m_y = tl.full((), float("-inf"), tl.float32)
        z_x = tl.zeros((), tl.float32)
        z_y = tl.zeros((), tl.float32)
        w = tl.zeros((), tl.float32)
        for start in range(0, n_valid, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_valid
            x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            y = tl.load(y_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
            diff = x - y  # 0 on masked lanes; -inf there would give (-inf) - (-inf) = nan
            x = tl.where(mask, x, float("-inf"))
            y = tl.where(mask, y, float("-inf"))
            # Every block holds >= 1 valid id, so new maxima are finite and exp(-inf - m) = 0.
            new_m_x = tl.maximum(m_x, tl.max(x, 0))
            new_m_y = tl.maximum(m_y, tl.max(y, 0))
            alpha_x = tl.exp(m_x - new_m_x)
            e_x = tl.exp(x - new_m_x)
            z_x = z_x * alpha_x + tl.sum(e_x, 0)
            w = w * alpha_x + tl.sum(e_x * diff, 0)
            z_y = z_y * tl.exp(m_y - new_m_y) + tl.sum(tl.exp(y - new_m_y), 0)
            m_x = new_m_x
            m_y = new_m_y
        tl.store(out_ptr + row, m_x)
        tl.store(out_ptr + n_tokens + row, m_y)
        tl.store(out_ptr + 2 * n_tokens + row, z_x)
        tl.store(out_ptr + 3 * n_tokens + row, z_y)
        tl.store(out_ptr + 4 * n_tokens + row, w)

    @triton.jit
    def _kd_grad_kernel(
        s_ptr, t_ptr, grad_ptr, scale_ptr, lse_s_ptr, lse_t_ptr, kl_ptr, n_valid,
        stride_s, stride_t, stride_grad, inv_t,
        REVERSE: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program per token: grad = scale * (q - p) (forward KL) or scale * q (log q - log p - KL)."""
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        g_row = grad_ptr + row * stride_grad
        scale = tl.load(scale_ptr + row)
        lse_s = tl.load(lse_s_ptr + row)
        lse_t = tl.load(lse_t_ptr + row)
        kl = tl.load(kl_ptr + row)
        for start in range(0, n_valid, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_valid
            log_q = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_s
            log_p = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_t
            q = tl.exp(log_q)
            if REVERSE:
                grad = q * (log_q - log_p - kl)
            else:
                grad = q - tl.exp(log_p)
            tl.store(g_row + cols, (grad * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def interpreter_active() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            "kd_logit_loss(impl='triton') on CPU tensors runs in Triton's interpreter, "
            "which must be switched on with TRITON_INTERPRET=1 before triton is first "
            "imported (import megatron.core imports it); set it in the environment of "
            "the process, or use impl='torch' on CPU."
        )
    if device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"kd_logit_loss(impl='triton') runs on cuda or cpu tensors, not {device}")


def _block_v(device: torch.device) -> int:
    return _BLOCK_V_CPU if device.type == "cpu" else _BLOCK_V_GPU


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Kernels index rows by stride and columns contiguously."""
    return t if t.stride(-1) == 1 else t.contiguous()


def local_stats(x: torch.Tensor, y: torch.Tensor, inv_t: float) -> torch.Tensor:
    """Per-token partials of KL(softmax(x) || softmax(y)) over this rank's slice.

    x, y: [tokens, n_valid_local] (any float dtype, same columns). Returns float32
    [5, tokens]: m_x, m_y (local maxima of x*inv_t, y*inv_t), z_x, z_y (sum-exp
    relative to those maxima) and w = sum exp(x*inv_t - m_x) * (x - y) * inv_t.
    """
    require_triton()
    x, y = _row_major(x), _row_major(y)
    n_tokens, n_valid = x.shape
    out = torch.empty(5, n_tokens, dtype=torch.float32, device=x.device)
    if n_tokens == 0:
        return out
    _check_device(x.device)
    _kd_stats_kernel[(n_tokens,)](
        x, y, out, n_tokens, n_valid, x.stride(0), y.stride(0), inv_t, BLOCK_V=_block_v(x.device)
    )
    return out


def student_grad(student, teacher, lse_s, lse_t, kl, scale, inv_t, reverse, out) -> None:
    """Write d loss / d student logits of one chunk into `out` (see `losses.TorchChunkMath.student_grad`)."""
    require_triton()
    student, teacher = _row_major(student), _row_major(teacher)
    n_tokens, n_valid = student.shape
    if n_tokens == 0:
        return
    target = out if out.stride(-1) == 1 else torch.empty_like(student)
    _check_device(student.device)
    _kd_grad_kernel[(n_tokens,)](
        student, teacher, target, scale.contiguous(), lse_s.contiguous(), lse_t.contiguous(),
        kl.contiguous(), n_valid, student.stride(0), teacher.stride(0), target.stride(0), inv_t,
        REVERSE=reverse, BLOCK_V=_block_v(student.device),
    )
    if target is not out:
        out.copy_(target)
