"""MoE token permute / unpermute (K6, G-K9): token copies to expert order and back.

`moe_permute(x [T, d], expert_ids [T, k], n_experts)` returns the T·k token copies sorted by
expert (stable, so copies of one expert keep token order), the per-expert counts, and the
permutation (`order`: sorted position i holds flat copy order[i] = t·k + j; `inverse`: its
inverse). `moe_unpermute(y [T·k, d], inverse, topk, weights)` sums each token's k returned
copies (optionally weighted), in fp32. Both equal `model.dispatcher.LocalDispatcher`'s
dispatch/combine.

Why kernels: permute is a row gather and unpermute a k-way gather-and-sum; eager PyTorch
materialises `index_select` results and a `[T, k, d]` fp32 temporary before the sum. Both kernels
here *gather* (no scatter, no atomics), so the results are bit-reproducible run to run (the
deterministic mode G-K9 asks for is the only mode). The sort itself stays `torch.argsort`.

Backward: permute's backward is an unweighted unpermute (sum of the k copies' gradients);
unpermute's backward w.r.t. y is a permute-gather scaled by each copy's weight; the weights'
gradient dout_t · y_copy is a small torch reduction.
"""

from __future__ import annotations

import torch

from .dispatch import lazy_jit, next_pow2, tl, use_triton

BLOCK_D = 128


# ------------------------------------------------------------------------------- routing
def sort_by_expert(expert_ids: torch.Tensor, n_experts: int):
    """expert_ids [T, k] -> (order [T·k], inverse [T·k], counts [E]) int64, no host sync."""
    flat = expert_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))
    return order, inverse, counts


# ------------------------------------------------------------------------------- reference
def moe_permute_ref(x: torch.Tensor, order: torch.Tensor, topk: int) -> torch.Tensor:
    return x.index_select(0, order // topk)


def moe_unpermute_ref(y: torch.Tensor, inverse: torch.Tensor, topk: int,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    out = y.float().index_select(0, inverse)                              # [T·k, d] token order
    if weights is not None:
        out = out * weights.reshape(-1).float()[:, None]
    return out.view(-1, topk, y.shape[1]).sum(dim=1)


# ------------------------------------------------------------------------------- kernels
@lazy_jit
def _gather_rows_kernel(src_ptr, idx_ptr, scale_ptr, dst_ptr, d, DIV: tl.constexpr,
                        HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[i] = src[idx[i] // DIV] (· scale[idx[i]])."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    j = tl.load(idx_ptr + i)
    row = tl.load(src_ptr + (j // DIV) * d + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        row = row * tl.load(scale_ptr + j).to(tl.float32)
    tl.store(dst_ptr + i * d + cols, row.to(dst_ptr.dtype.element_ty), mask=mask)


@lazy_jit
def _sum_copies_kernel(src_ptr, inv_ptr, w_ptr, dst_ptr, d, TOPK: tl.constexpr,
                       HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[t] = Σ_j src[inv[t·k + j]] (· w[t·k + j]), j in order, fp32."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(TOPK):
        pos = tl.load(inv_ptr + t * TOPK + j)
        row = tl.load(src_ptr + pos * d + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            row = row * tl.load(w_ptr + t * TOPK + j).to(tl.float32)
        acc += row
    tl.store(dst_ptr + t * d + cols, acc.to(dst_ptr.dtype.element_ty), mask=mask)


def _block(d: int) -> int:
    return min(BLOCK_D, next_pow2(max(d, 16)))


def gather_rows(src, idx, div: int, scale=None, out_dtype=None):
    n, d = idx.numel(), src.shape[1]
    dst = torch.empty(n, d, device=src.device, dtype=out_dtype or src.dtype)
    if n and d:
        blk = _block(d)
        _gather_rows_kernel[(n, -(-d // blk))](src, idx, scale if scale is not None else src,
                                               dst, d, DIV=div, HAS_SCALE=scale is not None,
                                               BLOCK_D=blk)
    return dst


def sum_copies(src, inverse, topk: int, weights=None, out_dtype=torch.float32):
    n_tok, d = inverse.numel() // topk, src.shape[1]
    dst = torch.empty(n_tok, d, device=src.device, dtype=out_dtype)
    if n_tok and d:
        blk = _block(d)
        _sum_copies_kernel[(n_tok, -(-d // blk))](src, inverse, weights if weights is not None
                                                  else src, dst, d, TOPK=topk,
                                                  HAS_W=weights is not None, BLOCK_D=blk)
    return dst


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, inverse, topk):
        ctx.save_for_backward(inverse)
        ctx.topk, ctx.x_dtype = topk, x.dtype
        return gather_rows(x.contiguous(), order, topk)

    @staticmethod
    def backward(ctx, dy):
        (inverse,) = ctx.saved_tensors
        return sum_copies(dy.contiguous(), inverse, ctx.topk, out_dtype=ctx.x_dtype), \
            None, None, None


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, inverse, order, topk, weights):
        y = y.contiguous()
        w = weights.reshape(-1).float().contiguous() if weights is not None else None
        ctx.save_for_backward(y, inverse, order, w)
        ctx.topk = topk
        ctx.w_dtype = weights.dtype if weights is not None else None
        return sum_copies(y, inverse, topk, w)

    @staticmethod
    def backward(ctx, dout):
        y, inverse, order, w = ctx.saved_tensors
        dout = dout.contiguous()
        k = ctx.topk
        dy = gather_rows(dout, order, k, scale=w, out_dtype=y.dtype)
        dw = None
        if w is not None and ctx.needs_input_grad[4]:
            copies = y.index_select(0, inverse).float().view(-1, k, y.shape[1])  # token order
            dw = (copies * dout.float()[:, None, :]).sum(-1).to(ctx.w_dtype)        # [T, k]
        return dy, None, None, None, dw


# ------------------------------------------------------------------------------- dispatchers
def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int):
    """x [T, d], expert_ids [T, k] -> (x_sorted [T·k, d] x dtype, counts [E] int64,
    order [T·k], inverse [T·k]). Differentiable in x."""
    order, inverse, counts = sort_by_expert(expert_ids, n_experts)
    topk = expert_ids.shape[1]
    if use_triton(x):
        return _PermuteFn.apply(x, order, inverse, topk), counts, order, inverse
    return moe_permute_ref(x, order, topk), counts, order, inverse


def moe_unpermute(y: torch.Tensor, inverse: torch.Tensor, order: torch.Tensor, topk: int,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """y [T·k, d] in sorted order -> [T, d] fp32: each token's k copies summed (times weights
    [T, k] in token order, if given). Differentiable in y and weights."""
    if use_triton(y, inverse):
        return _UnpermuteFn.apply(y, inverse, order, topk, weights)
    return moe_unpermute_ref(y, inverse, topk, weights)
