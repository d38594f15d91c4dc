"""Fused RMSNorm (K9): y = x · rsqrt(mean(x²) + eps) · w, fp32 math, output in x's dtype.

Why a kernel: eager PyTorch makes ~5 passes over the activations (cast, square, mean, scale,
weight, cast back) and keeps fp32 intermediates for backward. The kernel reads x once, writes y
once and saves only one fp32 rstd per row; backward recomputes x̂ from x and rstd.

Semantics equal `model.norm.RMSNorm` (weight given) and `model.norm.rms_normalize` followed by a
cast to x's dtype (weight None).

Backward, per row with g = dy·w and x̂ = x·rstd:
    dx = rstd · (g − x̂ · mean(g · x̂)),   dw = Σ_rows dy · x̂.
dw is reduced in two stages: each program sums its rows into one fp32 partial row, then torch
sums the few partials (deterministic; no atomics).
"""

from __future__ import annotations

import torch

from .dispatch import lazy_jit, next_pow2, tl, use_triton


# ------------------------------------------------------------------------------- reference
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., d], weight [d] | None -> [..., d] in x's dtype (fp32 math)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------- kernels
@lazy_jit
def _rms_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps,
                    HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = x * rstd
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@lazy_jit
def _rms_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, n_cols,
                    rows_per_prog, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * rows_per_prog  # int64 loop variable: no offset overflow
    for r in range(start, tl.minimum(start + rows_per_prog, n_rows)):
        off = r * n_cols + cols
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        xhat = x * rstd
        g = dy
        if HAS_W:
            g = dy * w
            dw_acc += dy * xhat
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=mask)


# ------------------------------------------------------------------------------- launchers
def _warps(d: int) -> int:
    """One row per program: more warps for wide rows keep registers per thread bounded."""
    return 4 if d <= 1024 else 8 if d <= 4096 else 16


def rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor | None, eps: float):
    """x2 [rows, d] contiguous -> (y [rows, d] x dtype, rstd [rows] fp32)."""
    rows, d = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(rows, device=x2.device, dtype=torch.float32)
    if rows:
        _rms_fwd_kernel[(rows,)](x2, weight if weight is not None else x2, y, rstd, d, eps,
                                 HAS_W=weight is not None, BLOCK=next_pow2(d),
                                 num_warps=_warps(d))
    return y, rstd


def rms_norm_bwd(dy2, x2, weight, rstd, n_progs: int | None = None):
    """-> (dx [rows, d] x dtype, dw [d] fp32 | None)."""
    rows, d = x2.shape
    if n_progs is None:
        n_progs = 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count \
            if x2.is_cuda else 4
    n_progs = max(1, min(n_progs, rows))
    rows_per_prog = -(-rows // n_progs) if rows else 1
    n_progs = -(-rows // rows_per_prog) if rows else 1
    dx = torch.empty_like(x2)
    dw_part = torch.zeros(n_progs, d, device=x2.device, dtype=torch.float32)
    if rows:
        _rms_bwd_kernel[(n_progs,)](x2, weight if weight is not None else x2, dy2, rstd, dx,
                                    dw_part, rows, d, rows_per_prog,
                                    HAS_W=weight is not None, BLOCK=next_pow2(d),
                                    num_warps=_warps(d))
    return dx, (dw_part.sum(0) if weight is not None else None)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        w = weight.contiguous() if weight is not None else None
        y, rstd = rms_norm_fwd(x2, w, eps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.has_w = weight is not None
        ctx.w_dtype = weight.dtype if weight is not None else None
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy.reshape(x2.shape).contiguous(), x2, w, rstd)
        if dw is not None:
            dw = dw.to(ctx.w_dtype)
        return dx.view(dy.shape), dw, None


# ------------------------------------------------------------------------------- dispatcher
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, fp32 math, result in x's dtype. x [..., d], weight [d] | None."""
    if use_triton(x, weight):
        return _RMSNormFn.apply(x, weight, eps)
    return rms_norm_ref(x, weight, eps)
