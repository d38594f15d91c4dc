"""mHC coefficients (K10, spec §3.2): pre, post and the Sinkhorn-projected comb in one launch.

Input is the per-token mixes m = RMSNorm_noweight(vec X) @ fnᵀ (`[..., (2+hc)·hc]`, fp32; the
projection is a plain GEMM and stays outside). Per token, with z = α·m + base per segment:

    pre  = σ(z[:hc]) + eps                       [hc]
    post = 2·σ(z[hc:2hc])                        [hc]
    comb = Sinkhorn(z[2hc:] as hc×hc, iters, eps) [hc, hc]

Sinkhorn in the official kernel's order (bit-faithful ordering, G-K8): row softmax + eps, a column
normalisation, then (iters − 1) × (row, column); each normalisation divides by (sum + eps). It
ends on columns. Why one kernel: eager PyTorch launches ~6 small kernels per Sinkhorn round, i.e.
~120 launches per site, each touching a tiny [tokens, 4, 4] tensor; here a program keeps a block
of tokens' 4×4 matrices in registers for all rounds.

Backward (Triton): the kernel returns dL/dz; the cheap reductions to dm, dbase and dscale are
torch ops. The 2·iters − 1 normalisation steps are differentiated in reverse; instead of storing
every intermediate matrix (≈2.5 KB per token at hc = 4) the kernel recomputes step s's input from
the softmax output (O(iters²) tiny ops per token, all in registers, no scratch memory). For a
column step y = x / (c + eps), c_k = Σ_j x_jk:
    dx_jk = g_jk/(c_k+eps) − Σ_j' g_j'k x_j'k/(c_k+eps)².
"""

from __future__ import annotations

import torch

from .dispatch import lazy_jit, next_pow2, tl, use_triton

BLOCK_T = 16  # tokens per program


# ------------------------------------------------------------------------------- reference
def sinkhorn_ref(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """logits [..., hc, hc] -> doubly-stochastic [..., hc, hc] fp32 (same ops as the model)."""
    p = torch.softmax(logits.float(), dim=-1) + eps
    p = p / (p.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        p = p / (p.sum(-1, keepdim=True) + eps)
        p = p / (p.sum(-2, keepdim=True) + eps)
    return p


def sinkhorn_gemm(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """`sinkhorn_ref` in 4 eager ops per round instead of 6, for devices without the Triton
    kernel (CPU): each `sum + eps` is one `baddbmm` against a ones vector with eps as its
    input. Decoding on CPU is bound by per-op overhead, not arithmetic, and Sinkhorn is a third
    of a decode step's ops (119 per mHC site). Same normalisation order and eps placement; a
    4-term sum by a GEMM may round differently from `sum` (1 ulp), so tests compare the two
    with an fp32 tolerance. Differentiable."""
    p = torch.softmax(logits.float(), dim=-1) + eps
    shape, hc = p.shape, p.shape[-1]
    p = p.reshape(-1, hc, hc)                                         # [T, hc, hc]
    col_ones = p.new_ones(1, 1, hc).expand(p.shape[0], 1, hc)         # sums over rows j
    row_ones = p.new_ones(1, hc, 1).expand(p.shape[0], hc, 1)         # sums over columns k
    e = p.new_full((1, 1, 1), eps)
    p = p / torch.baddbmm(e, col_ones, p)                             # column sums + eps
    for _ in range(iters - 1):
        p = p / torch.baddbmm(e, p, row_ones)                         # row sums + eps
        p = p / torch.baddbmm(e, col_ones, p)
    return p.reshape(shape)


def hc_split_sinkhorn_ref(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                          hc: int, iters: int, eps: float, sinkhorn=sinkhorn_ref):
    """mixes [..., (2+hc)·hc], scale [3], base [(2+hc)·hc] ->
    (pre [..., hc], post [..., hc], comb [..., hc, hc]), all fp32. `sinkhorn`: `sinkhorn_ref`
    or its equal `sinkhorn_gemm`."""
    m = mixes.float()
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(scale[0] * m[..., :hc] + base[:hc]) + eps
    post = 2 * torch.sigmoid(scale[1] * m[..., hc:2 * hc] + base[hc:2 * hc])
    res = (scale[2] * m[..., 2 * hc:] + base[2 * hc:]).unflatten(-1, (hc, hc))
    return pre, post, sinkhorn(res, iters, eps)


# ------------------------------------------------------------------------------- kernels
@lazy_jit
def _mhc_fwd_kernel(m_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, n_tok, iters, eps,
                    HC: tl.constexpr, HCP: tl.constexpr, BLOCK_T: tl.constexpr):
    NMIX: tl.constexpr = (2 + HC) * HC
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T]
    t_ok = t < n_tok
    a = tl.arange(0, HCP)
    a_ok = a < HC
    # pre / post: [T, HCP]
    vec_mask = t_ok[:, None] & a_ok[None, :]
    m_pre = tl.load(m_ptr + t[:, None] * NMIX + a[None, :], mask=vec_mask, other=0.0)
    m_post = tl.load(m_ptr + t[:, None] * NMIX + HC + a[None, :], mask=vec_mask, other=0.0)
    b_pre = tl.load(base_ptr + a, mask=a_ok, other=0.0)
    b_post = tl.load(base_ptr + HC + a, mask=a_ok, other=0.0)
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    pre = tl.sigmoid(s0 * m_pre.to(tl.float32) + b_pre[None, :]) + eps
    post = 2.0 * tl.sigmoid(s1 * m_post.to(tl.float32) + b_post[None, :])
    tl.store(pre_ptr + t[:, None] * HC + a[None, :], pre, mask=vec_mask)
    tl.store(post_ptr + t[:, None] * HC + a[None, :], post, mask=vec_mask)

    # comb: [T, HCP(j), HCP(k)]
    jk = a[:, None] * HC + a[None, :]                                   # [HCP, HCP]
    jk_ok = a_ok[:, None] & a_ok[None, :]
    mask3 = t_ok[:, None, None] & jk_ok[None, :, :]
    z = tl.load(m_ptr + t[:, None, None] * NMIX + 2 * HC + jk[None, :, :], mask=mask3, other=0.0)
    b_res = tl.load(base_ptr + 2 * HC + jk, mask=jk_ok, other=0.0)
    z = s2 * z.to(tl.float32) + b_res[None, :, :]
    z = tl.where(jk_ok[None, :, :], z, -1e30)
    e = tl.exp(z - tl.max(z, axis=2)[:, :, None])
    p = e / tl.sum(e, axis=2)[:, :, None]
    p = tl.where(jk_ok[None, :, :], p + eps, 0.0)                       # padding stays 0
    p = p / (tl.sum(p, axis=1)[:, None, :] + eps)
    for _ in range(iters - 1):
        p = p / (tl.sum(p, axis=2)[:, :, None] + eps)
        p = p / (tl.sum(p, axis=1)[:, None, :] + eps)
    tl.store(comb_ptr + t[:, None, None] * (HC * HC) + jk[None, :, :], p, mask=mask3)


@lazy_jit
def _mhc_bwd_kernel(m_ptr, scale_ptr, base_ptr, dpre_ptr, dpost_ptr, dcomb_ptr, dz_ptr, n_tok,
                    iters, eps, HC: tl.constexpr, HCP: tl.constexpr, BLOCK_T: tl.constexpr):
    NMIX: tl.constexpr = (2 + HC) * HC
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < n_tok
    a = tl.arange(0, HCP)
    a_ok = a < HC
    vec_mask = t_ok[:, None] & a_ok[None, :]
    s0 = tl.load(scale_ptr)
    s1 = tl.load(scale_ptr + 1)
    s2 = tl.load(scale_ptr + 2)
    # pre / post: d sigmoid
    m_pre = tl.load(m_ptr + t[:, None] * NMIX + a[None, :], mask=vec_mask, other=0.0)
    m_post = tl.load(m_ptr + t[:, None] * NMIX + HC + a[None, :], mask=vec_mask, other=0.0)
    sg = tl.sigmoid(s0 * m_pre.to(tl.float32)
                    + tl.load(base_ptr + a, mask=a_ok, other=0.0)[None, :])
    d = tl.load(dpre_ptr + t[:, None] * HC + a[None, :], mask=vec_mask, other=0.0)
    tl.store(dz_ptr + t[:, None] * NMIX + a[None, :], d * sg * (1.0 - sg), mask=vec_mask)
    sg = tl.sigmoid(s1 * m_post.to(tl.float32)
                    + tl.load(base_ptr + HC + a, mask=a_ok, other=0.0)[None, :])
    d = tl.load(dpost_ptr + t[:, None] * HC + a[None, :], mask=vec_mask, other=0.0)
    tl.store(dz_ptr + t[:, None] * NMIX + HC + a[None, :], 2.0 * d * sg * (1.0 - sg),
             mask=vec_mask)

    # comb: recompute the softmax, then walk the normalisation steps backwards
    jk = a[:, None] * HC + a[None, :]
    jk_ok = a_ok[:, None] & a_ok[None, :]
    mask3 = t_ok[:, None, None] & jk_ok[None, :, :]
    z = tl.load(m_ptr + t[:, None, None] * NMIX + 2 * HC + jk[None, :, :], mask=mask3, other=0.0)
    b_res = tl.load(base_ptr + 2 * HC + jk, mask=jk_ok, other=0.0)
    z = s2 * z.to(tl.float32) + b_res[None, :, :]
    z = tl.where(jk_ok[None, :, :], z, -1e30)
    e = tl.exp(z - tl.max(z, axis=2)[:, :, None])
    y = e / tl.sum(e, axis=2)[:, :, None]
    y = tl.where(jk_ok[None, :, :], y, 0.0)                             # softmax output
    p0 = tl.where(jk_ok[None, :, :], y + eps, 0.0)                      # state before step 0
    g = tl.load(dcomb_ptr + t[:, None, None] * (HC * HC) + jk[None, :, :], mask=mask3, other=0.0)
    n_steps = 2 * iters - 1                                             # step s: col if s even
    for r in range(n_steps):
        s = n_steps - 1 - r
        x = p0
        for i in range(s):                                              # input of step s
            col = (i % 2) == 0
            den = tl.where(col, tl.sum(x, axis=1)[:, None, :], tl.sum(x, axis=2)[:, :, None])
            x = x / (den + eps)
        col = (s % 2) == 0
        den = tl.where(col, tl.sum(x, axis=1)[:, None, :], tl.sum(x, axis=2)[:, :, None]) + eps
        gx = g * x
        dot = tl.where(col, tl.sum(gx, axis=1)[:, None, :], tl.sum(gx, axis=2)[:, :, None])
        # the broadcast term would leak into padding rows/columns (hc < HCP): keep them 0
        g = tl.where(jk_ok[None, :, :], g / den - dot / (den * den), 0.0)
    dz = y * (g - tl.sum(g * y, axis=2)[:, :, None])                    # softmax backward
    tl.store(dz_ptr + t[:, None, None] * NMIX + 2 * HC + jk[None, :, :], dz, mask=mask3)


# ------------------------------------------------------------------------------- launchers
def _check(mixes, scale, base, hc):
    nmix = (2 + hc) * hc
    if mixes.shape[-1] != nmix or base.shape != (nmix,) or scale.shape != (3,):
        raise ValueError(f"hc={hc}: expected mixes [..., {nmix}], base [{nmix}], scale [3]; got "
                         f"{tuple(mixes.shape)}, {tuple(base.shape)}, {tuple(scale.shape)}")


def mhc_fwd(m2: torch.Tensor, scale, base, hc: int, iters: int, eps: float):
    """m2 [T, nmix] contiguous -> pre [T, hc], post [T, hc], comb [T, hc, hc] (fp32)."""
    n_tok = m2.shape[0]
    dev = m2.device
    pre = torch.empty(n_tok, hc, device=dev, dtype=torch.float32)
    post = torch.empty(n_tok, hc, device=dev, dtype=torch.float32)
    comb = torch.empty(n_tok, hc, hc, device=dev, dtype=torch.float32)
    if n_tok:
        grid = (-(-n_tok // BLOCK_T),)
        _mhc_fwd_kernel[grid](m2, scale, base, pre, post, comb, n_tok, iters, eps,
                              HC=hc, HCP=next_pow2(hc), BLOCK_T=BLOCK_T)
    return pre, post, comb


def mhc_bwd(m2, scale, base, dpre, dpost, dcomb, hc: int, iters: int, eps: float):
    """-> dz [T, nmix] fp32: the gradient w.r.t. z = scale·m + base."""
    n_tok, nmix = m2.shape
    dz = torch.empty(n_tok, nmix, device=m2.device, dtype=torch.float32)
    if n_tok:
        grid = (-(-n_tok // BLOCK_T),)
        _mhc_bwd_kernel[grid](m2, scale, base, dpre, dpost, dcomb, dz, n_tok, iters, eps,
                              HC=hc, HCP=next_pow2(hc), BLOCK_T=BLOCK_T)
    return dz


class _HcSplitSinkhornFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixes, scale, base, hc, iters, eps):
        lead = mixes.shape[:-1]
        m2 = mixes.reshape(-1, mixes.shape[-1]).float().contiguous()
        sc, bs = scale.float().contiguous(), base.float().contiguous()
        pre, post, comb = mhc_fwd(m2, sc, bs, hc, iters, eps)
        ctx.save_for_backward(m2, sc, bs)
        ctx.cfg = (hc, iters, eps, lead, mixes.dtype, scale.dtype, base.dtype)
        return pre.view(*lead, hc), post.view(*lead, hc), comb.view(*lead, hc, hc)

    @staticmethod
    def backward(ctx, dpre, dpost, dcomb):
        m2, sc, bs = ctx.saved_tensors
        hc, iters, eps, lead, m_dtype, s_dtype, b_dtype = ctx.cfg
        n_tok = m2.shape[0]

        def flat(g, *shape):
            if g is None:
                return torch.zeros(n_tok, *shape, device=m2.device, dtype=torch.float32)
            return g.reshape(n_tok, *shape).float().contiguous()

        dz = mhc_bwd(m2, sc, bs, flat(dpre, hc), flat(dpost, hc), flat(dcomb, hc, hc),
                     hc, iters, eps)                                      # [T, nmix]
        scale_vec = torch.cat((sc[0].expand(hc), sc[1].expand(hc), sc[2].expand(hc * hc)))
        dm = dz * scale_vec                                               # [T, nmix]
        dbase = dz.sum(0)                                                 # [nmix]
        dzm = (dz * m2).sum(0)                                            # [nmix]
        dscale = torch.stack((dzm[:hc].sum(), dzm[hc:2 * hc].sum(), dzm[2 * hc:].sum()))
        return (dm.to(m_dtype).view(*lead, -1), dscale.to(s_dtype), dbase.to(b_dtype),
                None, None, None)


# ------------------------------------------------------------------------------- dispatcher
def hc_split_sinkhorn(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int,
                      iters: int, eps: float):
    """One mHC site's coefficients: mixes [..., (2+hc)·hc], scale [3], base [(2+hc)·hc] ->
    (pre [..., hc], post [..., hc], comb [..., hc, hc]), fp32, differentiable in all three
    tensor inputs. One kernel launch forward, one backward."""
    _check(mixes, scale, base, hc)
    if iters < 1:
        raise ValueError(f"iters={iters}: need at least one Sinkhorn round")
    if use_triton(mixes, scale, base):
        return _HcSplitSinkhornFn.apply(mixes, scale, base, int(hc), int(iters), float(eps))
    return hc_split_sinkhorn_ref(mixes, scale, base, hc, iters, eps, sinkhorn=sinkhorn_gemm)
