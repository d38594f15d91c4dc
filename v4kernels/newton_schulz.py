"""Symmetric Gram product A = X·Xᵀ for Newton-Schulz (K12, used by Muon).

Every Newton-Schulz iteration starts with A = X·Xᵀ on the small side of X ([..., m, n], m ≤ n).
A is symmetric, so half of the output tiles are mirror images: the kernel computes only the
tiles on and above the block diagonal (tile pairs (i, j) with i ≤ j, from a small host-built
table) and stores each one twice, as (i, j) and transposed as (j, i). That saves ~half the
FLOPs for m ≫ tile size (m/BM·(m/BM+1)/2 of (m/BM)² tiles). Diagonal tiles are symmetrised from
their upper triangle before storing, so the result is exactly symmetric (the reference `x @ xᵀ`
need not be, bit for bit).

Backward is not needed by Muon (NS runs under no_grad); for completeness `gram` is
differentiable through the torch formula dX = (G + Gᵀ)·X (a reference backward, not Triton).
"""

from __future__ import annotations

import torch

from .dispatch import dot_mode, lazy_jit, tl, use_triton

GPU_CFG = dict(BLOCK_M=128, BLOCK_K=64, num_warps=8)  # tensor-core tiles; retune from the bench
CPU_CFG = dict(BLOCK_M=32, BLOCK_K=32, num_warps=4)   # interpreter: few, small programs


# ------------------------------------------------------------------------------- reference
def gram_ref(x: torch.Tensor) -> torch.Tensor:
    """x [..., m, n] -> x·xᵀ [..., m, m] in x's dtype."""
    return x @ x.mT


# ------------------------------------------------------------------------------- kernel
@lazy_jit
def _gram_kernel(x_ptr, pair_i_ptr, pair_j_ptr, a_ptr, M, N, sxb, sxm, sxn,
                 DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    bi = tl.load(pair_i_ptr + tl.program_id(1))
    bj = tl.load(pair_j_ptr + tl.program_id(1))
    ri = bi * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = bj * BLOCK_M + tl.arange(0, BLOCK_M)
    x_base = x_ptr + b * sxb
    acc = tl.zeros([BLOCK_M, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < N
        xi = tl.load(x_base + ri[:, None] * sxm + ks[None, :] * sxn,
                     mask=(ri[:, None] < M) & k_ok[None, :], other=0.0).to(tl.float32)
        xj = tl.load(x_base + rj[:, None] * sxm + ks[None, :] * sxn,
                     mask=(rj[:, None] < M) & k_ok[None, :], other=0.0).to(tl.float32)
        if DOT == 1:
            acc += tl.dot(xi.to(tl.float16), tl.trans(xj.to(tl.float16)))
        elif DOT == 2:
            acc += tl.dot(xi.to(tl.bfloat16), tl.trans(xj.to(tl.bfloat16)))
        else:
            acc += tl.dot(xi, tl.trans(xj), input_precision="ieee")
    # diagonal tile: take the upper triangle and mirror it, so A is exactly symmetric (done
    # after the cast: the same values, half the registers for a bf16 output)
    out = acc.to(a_ptr.dtype.element_ty)
    out = tl.where((bi == bj) & (ri[:, None] > rj[None, :]), tl.trans(out), out)
    a_base = a_ptr + b * M * M
    tl.store(a_base + ri[:, None] * M + rj[None, :], out,
             mask=(ri[:, None] < M) & (rj[None, :] < M))
    tl.store(a_base + rj[:, None] * M + ri[None, :], tl.trans(out),    # mirrored tile, row-major
             mask=(rj[:, None] < M) & (ri[None, :] < M))


def _tile_pairs(m: int, block_m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    nb = -(-m // block_m)
    iu = torch.triu_indices(nb, nb)                                       # [2, nb(nb+1)/2]
    return iu[0].to(device=device, dtype=torch.int32), iu[1].to(device=device, dtype=torch.int32)


def gram_fwd(x: torch.Tensor) -> torch.Tensor:
    """x [..., m, n] -> [..., m, m] in x's dtype, via the triangle kernel."""
    lead, (m, n) = x.shape[:-2], x.shape[-2:]
    x3 = x.reshape(-1, m, n)
    out = torch.empty(x3.shape[0], m, m, device=x.device, dtype=x.dtype)
    if x3.shape[0] and m:
        if n == 0:
            return out.zero_().view(*lead, m, m)
        cfg = GPU_CFG if x.is_cuda else CPU_CFG
        pi, pj = _tile_pairs(m, cfg["BLOCK_M"], x.device)
        grid = (x3.shape[0], pi.numel())
        _gram_kernel[grid](x3, pi, pj, out, m, n, x3.stride(0), x3.stride(1), x3.stride(2),
                           DOT=dot_mode(x.dtype), **cfg)
    return out.view(*lead, m, m)


class _GramFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return gram_fwd(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (g + g.mT) @ x


# ------------------------------------------------------------------------------- dispatcher
def gram(x: torch.Tensor) -> torch.Tensor:
    """Symmetric X·Xᵀ of every matrix in x [..., m, n] -> [..., m, m], x's dtype, fp32
    accumulation. Pass the short side first (m ≤ n), as Newton-Schulz does."""
    if x.dim() < 2:
        raise ValueError(f"gram needs [..., m, n], got shape {tuple(x.shape)}")
    if use_triton(x):
        return _GramFn.apply(x)
    return gram_ref(x)
