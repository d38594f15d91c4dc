"""MoE expert GEMMs (K7): an M-grouped GEMM over expert-sorted rows, and the grouped SwiGLU.

`grouped_mm(x [N, K], w [E, K, M], counts [E]) -> y [N, M]`: rows are contiguous per expert
(the dispatcher's order), group e = the next counts[e] rows, y_rows(e) = x_rows(e) @ w[e]. w may
be any strided view, so the model's `w1 [E, inter, dim]` is passed as `w1.transpose(1, 2)`.

Why a kernel: the reference pads every group to the largest one (`[E, capacity, K]` + bmm), so
compute and memory scale with E·max(count) and it needs a host sync to read the capacity. The
kernel tiles each group separately: M-tile t of the launch finds its group by a device-side
`searchsorted` over per-group tile counts (no host sync; the grid is the static bound
cdiv(N, BLOCK_M) + E tiles, surplus tiles exit at once). Empty groups cost nothing.

Backward (Triton): dx = grouped_mm(dy, wᵀ) reuses the forward kernel with transposed strides;
dw[e] = x_eᵀ · dy_e is a K-grouped GEMM, one program per (expert, K tile, M tile) looping over the
expert's rows (an expert with no rows gets dw = 0).

`torch._grouped_mm` (CUDA, Hopper+) is selectable with `V4_GROUPED_MM=torch` (groups padded to
16 rows, as its kernel needs aligned group starts); `bench/triton_kernels.py` compares it with the
Triton kernel so the default can follow the measurement.
"""

from __future__ import annotations

import os

import torch

from .dispatch import dot_mode, lazy_jit, tl, use_triton
from .swiglu import swiglu, swiglu_ref

# Tile sizes: tensor-core sized on a GPU; small under the interpreter, where every program is a
# Python loop iteration and the test shapes are tiny. (No autotune: it cannot run without a GPU
# driver, doc §3.3; retune from bench/triton_kernels.py.)
GPU_CFG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8)
CPU_CFG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4)
TORCH_ALIGN = 16


def _cfg(t: torch.Tensor) -> dict:
    return GPU_CFG if t.is_cuda else CPU_CFG


# ------------------------------------------------------------------------------- reference
def grouped_mm_ref(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Padded reference (same scheme as `model.moe.experts_padded`): scatter the rows into
    [E, capacity, K], one bmm, gather back. x [N, K], w [E, K, M], counts [E] -> [N, M]."""
    n = x.shape[0]
    n_exp = w.shape[0]
    counts = counts.long()
    if n == 0:
        return x.new_zeros(0, w.shape[2])
    eid = torch.repeat_interleave(torch.arange(n_exp, device=x.device), counts, output_size=n)
    pos = torch.arange(n, device=x.device) - (counts.cumsum(0) - counts)[eid]
    capacity = int(counts.max())                                          # host sync
    xp = x.new_zeros(n_exp, capacity, x.shape[1]).index_put((eid, pos), x)  # [E, C, K]
    return torch.bmm(xp, w.to(x.dtype))[eid, pos]                          # [N, M]


def grouped_swiglu_experts_ref(x, counts, weights, w1, w3, w2, limit):
    """Same arguments and result as `grouped_swiglu_experts`, via the reference GEMM."""
    gate = grouped_mm_ref(x, w1.transpose(1, 2), counts)
    up = grouped_mm_ref(x, w3.transpose(1, 2), counts)
    h = swiglu_ref(gate, up, limit)                                        # fp32
    if weights is not None:
        h = h * weights.float()[:, None]
    return grouped_mm_ref(h.to(x.dtype), w2.transpose(1, 2), counts)


# ------------------------------------------------------------------------------- kernels
@lazy_jit
def _gmm_fwd_kernel(x_ptr, w_ptr, y_ptr, tile_group_ptr, tile_first_ptr, group_start_ptr,
                    counts_ptr, n_exp, K, M, sxn, sxk, swe, swk, swm, syn, sym,
                    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    g = tl.load(tile_group_ptr + pid_m)
    if g >= n_exp:                                   # surplus tile of the static grid
        return
    start = tl.load(group_start_ptr + g)
    end = start + tl.load(counts_ptr + g)
    r = start + (pid_m - tl.load(tile_first_ptr + g)) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64
    r_ok = r < end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < M
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + r[:, None] * sxn + ks[None, :] * sxk                # [BLOCK_M, BLOCK_K]
    b_ptrs = w_ptr + g * swe + ks[:, None] * swk + cols[None, :] * swm    # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        if DOT == 0:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif DOT == 1:
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
        else:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        a_ptrs += BLOCK_K * sxk
        b_ptrs += BLOCK_K * swk
    tl.store(y_ptr + r[:, None] * syn + cols[None, :] * sym, acc.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])


@lazy_jit
def _gmm_dw_kernel(x_ptr, dy_ptr, dw_ptr, group_start_ptr, counts_ptr, K, M,
                   sxn, sxk, syn, sym, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < K
    c_ok = cols < M
    start = tl.load(group_start_ptr + e)
    end = start + tl.load(counts_ptr + e)
    rs = tl.arange(0, BLOCK_M)
    a_ptrs = x_ptr + (start + rs)[:, None] * sxn + ks[None, :] * sxk      # [BLOCK_M, BLOCK_K]
    b_ptrs = dy_ptr + (start + rs)[:, None] * syn + cols[None, :] * sym   # [BLOCK_M, BLOCK_N]
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        r_ok = (r0 + rs) < end
        a = tl.load(a_ptrs, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        if DOT == 0:
            acc = tl.dot(tl.trans(a.to(tl.float32)), b.to(tl.float32), acc,
                         input_precision="ieee")
        elif DOT == 1:
            acc = tl.dot(tl.trans(a.to(tl.float16)), b.to(tl.float16), acc)
        else:
            acc = tl.dot(tl.trans(a.to(tl.bfloat16)), b.to(tl.bfloat16), acc)
        a_ptrs += BLOCK_M * sxn
        b_ptrs += BLOCK_M * syn
    tl.store(dw_ptr + e * K * M + ks[:, None] * M + cols[None, :], acc,
             mask=k_ok[:, None] & c_ok[None, :])


# ------------------------------------------------------------------------------- launchers
def _schedule(counts: torch.Tensor, n_rows: int, block_m: int):
    """Device-side tile map (no host sync): -> (tile_group [max_tiles], tile_first [E],
    group_start [E], counts [E]) int64 and max_tiles = cdiv(N, block_m) + E, a static bound."""
    counts = counts.long()
    n_exp = counts.numel()
    tiles = (counts + block_m - 1) // block_m                              # [E]
    tile_end = tiles.cumsum(0)                                             # [E]
    max_tiles = -(-n_rows // block_m) + n_exp
    tile_ids = torch.arange(max_tiles, device=counts.device)
    tile_group = torch.searchsorted(tile_end, tile_ids, right=True)        # E = no group
    return tile_group, tile_end - tiles, counts.cumsum(0) - counts, counts, max_tiles


def grouped_mm_fwd(x: torch.Tensor, w: torch.Tensor, sched, out_dtype) -> torch.Tensor:
    n, k = x.shape
    n_exp, _, m = w.shape
    y = torch.empty(n, m, device=x.device, dtype=out_dtype)
    tile_group, tile_first, group_start, counts, max_tiles = sched
    if n and m:
        cfg = _cfg(x)
        grid = (max_tiles, -(-m // cfg["BLOCK_N"]))
        _gmm_fwd_kernel[grid](x, w, y, tile_group, tile_first, group_start, counts, n_exp, k, m,
                              x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
                              y.stride(0), y.stride(1), DOT=dot_mode(x.dtype), **cfg)
    elif m:
        y.zero_()
    return y


def grouped_mm_dw(x: torch.Tensor, dy: torch.Tensor, sched, n_exp: int) -> torch.Tensor:
    """-> dw [E, K, M] fp32."""
    k, m = x.shape[1], dy.shape[1]
    _, _, group_start, counts, _ = sched
    dw = torch.empty(n_exp, k, m, device=x.device, dtype=torch.float32)
    if n_exp and k and m:
        cfg = _cfg(x)
        grid = (n_exp, -(-k // cfg["BLOCK_K"]), -(-m // cfg["BLOCK_N"]))
        _gmm_dw_kernel[grid](x, dy, dw, group_start, counts, k, m, x.stride(0), x.stride(1),
                             dy.stride(0), dy.stride(1), DOT=dot_mode(x.dtype), **cfg)
    return dw


class _GroupedMMFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts):
        w_c = w.to(x.dtype)
        sched = _schedule(counts, x.shape[0], _cfg(x)["BLOCK_M"])
        ctx.save_for_backward(x, w_c, *sched[:4])
        ctx.max_tiles = sched[4]
        ctx.w_dtype = w.dtype
        return grouped_mm_fwd(x, w_c, sched, x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, *sched = ctx.saved_tensors
        sched = (*sched, ctx.max_tiles)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = grouped_mm_fwd(dy, w.transpose(1, 2), sched, x.dtype)
        if ctx.needs_input_grad[1]:
            dw = grouped_mm_dw(x, dy, sched, w.shape[0]).to(ctx.w_dtype)
        return dx, dw, None


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                     align: int = TORCH_ALIGN) -> torch.Tensor:
    """`torch._grouped_mm` with every group padded to `align` rows (static buffer bound
    N + E·(align−1), no host sync); the last group absorbs the slack rows."""
    n, n_exp = x.shape[0], w.shape[0]
    counts = counts.long()
    padded = (counts + align - 1) // align * align
    n_pad = -(-(n + n_exp * (align - 1)) // align) * align
    eid = torch.repeat_interleave(torch.arange(n_exp, device=x.device), counts, output_size=n)
    dest = (torch.arange(n, device=x.device) - (counts.cumsum(0) - counts)[eid]
            + (padded.cumsum(0) - padded)[eid])                            # [N] padded row
    offs = padded.cumsum(0).to(torch.int32)
    offs[-1] = n_pad
    xp = x.new_zeros(n_pad, x.shape[1]).index_put((dest,), x)
    return torch._grouped_mm(xp, w.to(x.dtype), offs=offs).index_select(0, dest)


# ------------------------------------------------------------------------------- dispatchers
def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [N, K] sorted by group, w [E, K, M] (any strides), counts [E] int (sum N) ->
    [N, M] in x's dtype (fp32 accumulation). Differentiable in x and w."""
    if x.dim() != 2 or w.dim() != 3 or w.shape[1] != x.shape[1] or counts.shape != w.shape[:1]:
        raise ValueError(f"grouped_mm: x [N, K], w [E, K, M], counts [E]; got "
                         f"{tuple(x.shape)}, {tuple(w.shape)}, {tuple(counts.shape)}")
    if use_triton(x, w, counts):
        if (os.environ.get("V4_GROUPED_MM", "triton") == "torch" and x.is_cuda
                and hasattr(torch, "_grouped_mm")):
            return grouped_mm_torch(x, w, counts)
        return _GroupedMMFn.apply(x, w, counts)
    return grouped_mm_ref(x, w, counts)


def grouped_swiglu_experts(x: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor | None,
                           w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
                           limit: float) -> torch.Tensor:
    """Routed experts' SwiGLU on expert-sorted rows; the arguments and result of
    `model.moe.experts_padded`: x [N, dim], counts [E], weights [N] | None, w1/w3 [E, inter,
    dim], w2 [E, dim, inter] -> [N, dim] in x's dtype (matmuls in x's dtype, activation fp32,
    routing weight applied to h before w2)."""
    if not use_triton(x, counts, w1):
        return grouped_swiglu_experts_ref(x, counts, weights, w1, w3, w2, limit)
    gate = grouped_mm(x, w1.transpose(1, 2), counts)                      # [N, inter]
    up = grouped_mm(x, w3.transpose(1, 2), counts)                        # [N, inter]
    h = swiglu(gate, up, limit)                                           # [N, inter] fp32
    if weights is not None:
        h = h * weights.float()[:, None]
    return grouped_mm(h.to(x.dtype), w2.transpose(1, 2), counts)          # [N, dim]
