"""V4's clamped SwiGLU (K9, spec §5.3): h = silu(min(gate, L)) · clamp(up, −L, L), fp32 math.

Why a kernel: eager PyTorch materialises the fp32 casts, both clamps, the sigmoid and the
product as separate tensors and saves several of them for backward. The kernel reads gate and
up once and writes h once; backward recomputes everything from gate and up.

Semantics equal `model.moe.swiglu`: the clamp is off when `limit <= 0`, the gate is clamped from
above only (silu is bounded below), and the result is fp32 by default (the model multiplies the
routing weight in fp32 before casting). `out_dtype` stores h narrower to save memory.

Gradients follow torch's clamp rule (gradient passes where the input lies inside the closed
interval [min, max]) and silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import lazy_jit, tl, use_triton

BLOCK = 1024


# ------------------------------------------------------------------------------- reference
def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, limit: float,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """gate, up [...] -> h [...] fp32 (or out_dtype)."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    h = F.silu(gate) * up
    return h if out_dtype is None else h.to(out_dtype)


# ------------------------------------------------------------------------------- kernels
@lazy_jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, limit, CLAMP: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLAMP:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, n, limit, CLAMP: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CLAMP:
        g_pass = g <= limit
        u_pass = (u >= -limit) & (u <= limit)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dh * u * (sig * (1.0 + g * (1.0 - sig)))
    du = dh * silu
    if CLAMP:
        dg = tl.where(g_pass, dg, 0.0)
        du = tl.where(u_pass, du, 0.0)
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------- launchers
def _grid(n: int):
    return (max(1, -(-n // BLOCK)),)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, limit: float,
               out_dtype: torch.dtype) -> torch.Tensor:
    h = torch.empty(gate.shape, device=gate.device, dtype=out_dtype)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[_grid(n)](gate, up, h, n, float(limit), CLAMP=limit > 0, BLOCK=BLOCK)
    return h


def swiglu_bwd(gate, up, dh, limit):
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[_grid(n)](gate, up, dh, dg, du, n, float(limit), CLAMP=limit > 0,
                                     BLOCK=BLOCK)
    return dg, du


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, limit, out_dtype):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.limit = limit
        return swiglu_fwd(gate, up, limit, out_dtype)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = swiglu_bwd(gate, up, dh.contiguous(), ctx.limit)
        return dg, du, None, None


# ------------------------------------------------------------------------------- dispatcher
def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Clamped SwiGLU; gate and up of one shape (any float dtype) -> fp32 (or out_dtype)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if use_triton(gate, up):
        return _SwiGLUFn.apply(gate, up, float(limit), out_dtype or torch.float32)
    return swiglu_ref(gate, up, limit, out_dtype)
