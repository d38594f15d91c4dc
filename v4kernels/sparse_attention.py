"""Sparse attention over per-query index lists (K1/K3/K4, spec §4.6): the V4 attention core.

Every V4 attention type is one softmax per query over a *list* of KV rows plus a sink:
SWA = the window slots; CSA = window + the indexer's top-k compressed entries; HCA = window + all
visible compressed entries. Put the raw KV and the compressed entries in one table
`kv_all = cat(kv, comp)` and give each query the row numbers it may see (−1 = skip); then

    z_j = scale · q_h · kv[idx_j]          (fp32)
    out_h = Σ_j exp(z_j − lse_h) · kv[idx_j],   lse_h = log(Σ_j exp(z_j) + exp(sink_h))

K = V (shared-KV MQA): one gathered row serves as key and value for every head. The sink adds
mass to the denominator only. `hybrid_indices` builds the lists that make this equal to
`model.attention_core.hybrid_attention`.

Why a kernel: the work is O(seq · k) instead of O(seq²), but eager PyTorch must materialise the
gathered rows `[b, s, k, c]` (k·c floats per query). The forward kernel gathers a tile of KV rows
per step and runs FlashAttention's online softmax over the list, so nothing but q, the output and
one lse per (query, head) touches memory. A program handles one query token and a block of heads,
so each gathered row is loaded once per head block and reused by all its heads.

Backward (Triton): per (query, head block), recompute p from the saved lse, then
dq = scale · Σ_j ds_j kv_j, and the contributions pᵀ·dO + scale · dsᵀ·q of every listed row are
added into an fp32 dkv buffer with atomics (rows are shared across queries). Atomics make dkv's
summation order, hence its last bits, run-dependent on GPU. dsink = −Σ exp(sink − lse)·(dO·out)
is a cheap torch reduction.
"""

from __future__ import annotations

import torch

from .dispatch import dot_mode, lazy_jit, next_pow2, tl, use_triton

MASKED = -1e30  # reference: finite "−inf", exp() → 0 without NaN gradients on empty lists
BLOCK_K = 16    # index-list entries per step
MAX_BLOCK_H = 16


# ------------------------------------------------------------------------------- index lists
def window_indices(doc_ids: torch.Tensor, window: int) -> torch.Tensor:
    """Rows of the sliding window: query t sees t−window+1 .. t inside its own document.
    doc_ids [b, s] -> [b, s, window] int64 (−1 where out of range or another document)."""
    s = doc_ids.shape[1]
    dev = doc_ids.device
    t = torch.arange(s, device=dev)[:, None]
    j = t - window + 1 + torch.arange(window, device=dev)[None, :]         # [s, window]
    jc = j.clamp(min=0)
    same_doc = doc_ids[:, jc] == doc_ids[:, :, None]                        # [b, s, window]
    ok = (j >= 0)[None] & same_doc
    return torch.where(ok, jc[None], -1)


def hybrid_indices(doc_ids: torch.Tensor, window: int, n_raw: int,
                   comp_idx: torch.Tensor | None = None,
                   comp_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Index lists into `cat(kv [b, n_raw, c], comp [b, n, c], dim=1)`: window slots followed by
    the compressed entries, either sparse (`comp_idx` [b, s, k], −1 = none) or dense
    (`comp_mask` [b, s, n] bool). Same arguments as `hybrid_attention`. -> [b, s, window + k|n]."""
    idx = window_indices(doc_ids, window)
    if comp_idx is not None:
        comp = torch.where(comp_idx >= 0, comp_idx.long() + n_raw, -1)
    elif comp_mask is not None:
        n = comp_mask.shape[-1]
        rows = torch.arange(n_raw, n_raw + n, device=comp_mask.device)
        comp = torch.where(comp_mask, rows, -1)
    else:
        return idx
    return torch.cat((idx, comp), dim=-1)


# ------------------------------------------------------------------------------- reference
def sparse_attention_ref(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                         sink: torch.Tensor, scale: float, out_dtype: torch.dtype | None = None,
                         return_lse: bool = False, chunk_elems: int = 1 << 26):
    """Gather-based reference, chunked over the sequence so the gathered `[b, chunk, k, c]`
    stays under `chunk_elems` floats. Same signature and results as `sparse_attention`."""
    b, s, h, c = q.shape
    k = indices.shape[-1]
    qf, kvf = q.float(), kv.float()
    sink_f = sink.float().view(1, 1, h, 1)
    # while compiling, one chunk: a step computed from a dynamic batch size is a guard
    step = s if torch.compiler.is_compiling() else max(1, chunk_elems // max(1, b * k * c))
    outs, lses = [], []
    for s0 in range(0, s, step):
        idx = indices[:, s0:s0 + step].long()                             # [b, cs, k]
        cs = idx.shape[1]
        rows = kvf.gather(1, idx.clamp(min=0).reshape(b, cs * k, 1).expand(-1, -1, c))
        rows = rows.view(b, cs, k, c)                                      # [b, cs, k, c]
        z = torch.einsum("bshc,bskc->bshk", qf[:, s0:s0 + step], rows) * scale
        z = z.masked_fill((idx < 0)[:, :, None, :], MASKED)                # [b, cs, h, k]
        lse = torch.logsumexp(torch.cat((z, sink_f.expand(b, cs, h, 1)), -1), -1)  # [b, cs, h]
        p = torch.exp(z - lse[..., None])
        outs.append(torch.einsum("bshk,bskc->bshc", p, rows))
        lses.append(lse)
    out = torch.cat(outs, 1) if outs else qf.new_zeros(b, 0, h, c)
    out = out.to(out_dtype or torch.float32)
    if return_lse:
        lse = torch.cat(lses, 1) if lses else qf.new_zeros(b, 0, h)
        return out, lse.detach()
    return out


# ------------------------------------------------------------------------------- kernels
@lazy_jit
def _sparse_attn_fwd_kernel(q_ptr, kv_ptr, idx_ptr, sink_ptr, o_ptr, lse_ptr,
                            S, H, N, C, K, scale, DOT: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_q = tl.program_id(0).to(tl.int64)           # flattened (batch, query)
    bi = pid_q // S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    hc_mask = h_ok[:, None] & c_ok[None, :]
    q = tl.load(q_ptr + pid_q * H * C + heads[:, None] * C + cs[None, :], mask=hc_mask,
                other=0.0).to(tl.float32)
    if DOT == 1:
        q = q.to(tl.float16)
    if DOT == 2:
        q = q.to(tl.bfloat16)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    kv_base = kv_ptr + bi * N * C
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + pid_q * K + ks, mask=ks < K, other=-1).to(tl.int64)
        valid = idx >= 0
        rows = tl.load(kv_base + idx[:, None] * C + cs[None, :],
                       mask=valid[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        if DOT == 1:
            rows = rows.to(tl.float16)
        if DOT == 2:
            rows = rows.to(tl.bfloat16)
        if DOT == 0:
            z = tl.dot(q, tl.trans(rows), input_precision="ieee")      # [BLOCK_H, BLOCK_K]
        else:
            z = tl.dot(q, tl.trans(rows))
        z = tl.where(valid[None, :], z * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)          # empty so far: no NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(z - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT == 0:
            pv = tl.dot(p, rows, input_precision="ieee")
        else:
            pv = tl.dot(p.to(rows.dtype), rows)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    sink = tl.load(sink_ptr + heads, mask=h_ok, other=0.0).to(tl.float32)
    m_fin = tl.maximum(m_i, sink)                                      # finite: sink is
    alpha = tl.exp(m_i - m_fin)
    l_fin = l_i * alpha + tl.exp(sink - m_fin)
    out = acc * (alpha / l_fin)[:, None]
    tl.store(o_ptr + pid_q * H * C + heads[:, None] * C + cs[None, :],
             out.to(o_ptr.dtype.element_ty), mask=hc_mask)
    tl.store(lse_ptr + pid_q * H + heads, m_fin + tl.log(l_fin), mask=h_ok)


@lazy_jit
def _sparse_attn_bwd_kernel(q_ptr, kv_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dkv_ptr,
                            S, H, N, C, K, scale, DOT: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_q = tl.program_id(0).to(tl.int64)
    bi = pid_q // S
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < C
    hc_mask = h_ok[:, None] & c_ok[None, :]
    hc_off = pid_q * H * C + heads[:, None] * C + cs[None, :]
    q = tl.load(q_ptr + hc_off, mask=hc_mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + hc_off, mask=hc_mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + pid_q * H + heads, mask=h_ok, other=0.0)
    delta = tl.load(delta_ptr + pid_q * H + heads, mask=h_ok, other=0.0)
    if DOT == 1:
        q = q.to(tl.float16)
        do = do.to(tl.float16)
    if DOT == 2:
        q = q.to(tl.bfloat16)
        do = do.to(tl.bfloat16)
    dq = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    kv_base = kv_ptr + bi * N * C
    dkv_base = dkv_ptr + bi * N * C
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + pid_q * K + ks, mask=ks < K, other=-1).to(tl.int64)
        valid = idx >= 0
        row_mask = valid[:, None] & c_ok[None, :]
        rows = tl.load(kv_base + idx[:, None] * C + cs[None, :], mask=row_mask,
                       other=0.0).to(tl.float32)
        if DOT == 1:
            rows = rows.to(tl.float16)
        if DOT == 2:
            rows = rows.to(tl.bfloat16)
        if DOT == 0:
            z = tl.dot(q, tl.trans(rows), input_precision="ieee")      # [BLOCK_H, BLOCK_K]
            dp = tl.dot(do, tl.trans(rows), input_precision="ieee")
        else:
            z = tl.dot(q, tl.trans(rows))
            dp = tl.dot(do, tl.trans(rows))
        p = tl.exp(z * scale - lse[:, None])
        p = tl.where(h_ok[:, None] & valid[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        if DOT == 0:
            dq += tl.dot(ds, rows, input_precision="ieee")
            drows = tl.dot(tl.trans(p), do, input_precision="ieee") \
                + tl.dot(tl.trans(ds), q, input_precision="ieee") * scale  # [BLOCK_K, BLOCK_C]
        else:
            p_d = p.to(rows.dtype)
            ds_d = ds.to(rows.dtype)
            dq += tl.dot(ds_d, rows)
            drows = tl.dot(tl.trans(p_d), do) + tl.dot(tl.trans(ds_d), q) * scale
        tl.atomic_add(dkv_base + idx[:, None] * C + cs[None, :], drows, mask=row_mask)
    tl.store(dq_ptr + hc_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=hc_mask)


# ------------------------------------------------------------------------------- launchers
def _blocks(h: int, c: int):
    return min(max(16, next_pow2(h)), MAX_BLOCK_H), max(16, next_pow2(c))


def sparse_attention_fwd(q, kv, indices, sink, scale: float, out_dtype: torch.dtype):
    """Contiguous q [b,s,h,c], kv [b,n,c], indices [b,s,k], sink [h] fp32 ->
    (out [b,s,h,c] out_dtype, lse [b,s,h] fp32)."""
    b, s, h, c = q.shape
    n, k = kv.shape[1], indices.shape[-1]
    out = torch.empty(b, s, h, c, device=q.device, dtype=out_dtype)
    lse = torch.empty(b, s, h, device=q.device, dtype=torch.float32)
    if b * s and h:
        block_h, block_c = _blocks(h, c)
        grid = (b * s, -(-h // block_h))
        _sparse_attn_fwd_kernel[grid](q, kv, indices, sink, out, lse, s, h, n, c, k,
                                      float(scale), DOT=dot_mode(q.dtype), BLOCK_H=block_h,
                                      BLOCK_K=BLOCK_K, BLOCK_C=block_c,
                                      num_warps=8 if block_c >= 256 else 4)
    return out, lse


def sparse_attention_bwd(q, kv, indices, lse, out, dout, scale: float):
    """-> (dq [b,s,h,c] q dtype, dkv [b,n,c] fp32, delta [b,s,h] fp32)."""
    b, s, h, c = q.shape
    n, k = kv.shape[1], indices.shape[-1]
    delta = (dout.float() * out.float()).sum(-1).contiguous()            # [b, s, h]
    dq = torch.empty_like(q)
    dkv = torch.zeros(b, n, c, device=q.device, dtype=torch.float32)
    if b * s and h:
        block_h, block_c = _blocks(h, c)
        grid = (b * s, -(-h // block_h))
        _sparse_attn_bwd_kernel[grid](q, kv, indices, dout, lse, delta, dq, dkv, s, h, n, c, k,
                                      float(scale), DOT=dot_mode(q.dtype), BLOCK_H=block_h,
                                      BLOCK_K=BLOCK_K, BLOCK_C=block_c,
                                      num_warps=8 if block_c >= 256 else 4)
    return dq, dkv, delta


class _SparseAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, indices, sink, scale, out_dtype):
        q, kv, indices = q.contiguous(), kv.contiguous(), indices.contiguous()
        sink_f = sink.float().contiguous()
        out, lse = sparse_attention_fwd(q, kv, indices, sink_f, scale, out_dtype)
        ctx.save_for_backward(q, kv, indices, sink_f, out, lse)
        ctx.scale = scale
        ctx.dtypes = (kv.dtype, sink.dtype)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, kv, indices, sink_f, out, lse = ctx.saved_tensors
        dq, dkv, delta = sparse_attention_bwd(q, kv, indices, lse, out, dout.contiguous(),
                                              ctx.scale)
        dsink = -(torch.exp(sink_f - lse) * delta).sum((0, 1))            # [h]
        kv_dtype, sink_dtype = ctx.dtypes
        return dq, dkv.to(kv_dtype), None, dsink.to(sink_dtype), None, None


# ------------------------------------------------------------------------------- dispatcher
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                     sink: torch.Tensor, scale: float, out_dtype: torch.dtype | None = None,
                     return_lse: bool = False):
    """Attention of every query over its own KV rows plus a sink.

    q [b, s, h, c], kv [b, n, c] (K = V), indices [b, s, k] int (row numbers into kv, −1 =
    skip; duplicates count twice), sink [h], scale (V4: c^−0.5). Returns out [b, s, h, c] in
    `out_dtype` (default fp32, like `hybrid_attention`), and with `return_lse` also the
    log-sum-exp including the sink, [b, s, h] fp32, non-differentiable (for the indexer target
    p_j = exp(z_j − lse)). A query with no valid row gets a zero output and lse = sink.
    Differentiable in q, kv and sink.
    """
    b, s, h, c = q.shape
    if kv.dim() != 3 or kv.shape[0] != b or kv.shape[2] != c:
        raise ValueError(f"kv: expected [{b}, n, {c}], got {tuple(kv.shape)}")
    if indices.dim() != 3 or indices.shape[:2] != (b, s) or indices.is_floating_point():
        raise ValueError(f"indices: expected integer [{b}, {s}, k], got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    if sink.shape != (h,):
        raise ValueError(f"sink: expected [{h}], got {tuple(sink.shape)}")
    out_dtype = out_dtype or torch.float32
    if use_triton(q, kv, indices, sink):
        out, lse = _SparseAttentionFn.apply(q, kv, indices, sink, float(scale), out_dtype)
        return (out, lse) if return_lse else out
    return sparse_attention_ref(q, kv, indices, sink, scale, out_dtype, return_lse)
