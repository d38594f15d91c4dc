"""The attention core shared by SWA, CSA and HCA (spec §4.6), in plain PyTorch.

Every query attends to one softmax over: the raw KV of its sliding window (the last `window`
tokens of its document, itself included), the compressed entries it may use (CSA: the indexer's
top-k, or all visible ones in dense mode; HCA: all visible), and a learned per-head sink that only
adds mass to the denominator. K and V are the same 512-d vector (shared-KV MQA).

Memory is linear in sequence length for the window (queries are processed in blocks of `window`,
each against its own and the previous block: `[batch, heads, blocks, window, 2·window]`) and
`seq · n_entries` for the compressed part, so no `[seq, seq]` tensor exists. The two parts are
merged exactly through their log-sum-exps. Scores and softmax are fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import v4kernels

from .norm import fp32_region

# A finite "minus infinity": masked scores contribute exp(-1e30) = 0 without producing NaN
# gradients when a query has no visible compressed entry.
MASKED = -1e30


def window_scores(q: torch.Tensor, kv: torch.Tensor, doc_ids: torch.Tensor, window: int,
                  scale: float):
    """Blocked sliding-window scores.

    q: `[batch, seq, heads, c]`, kv: `[batch, seq, c]`, doc_ids: `[batch, seq]`.
    Returns (scores `[batch, heads, blocks, window, 2·window]` masked with MASKED,
    keys `[batch, blocks, 2·window, c]`).
    """
    batch, seq, heads, c = q.shape
    w = window
    nb = -(-seq // w)
    pad = nb * w - seq
    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).view(batch, nb, w, heads, c)
    kvp = F.pad(kv, (0, 0, w, pad))  # one empty block in front: block i sees blocks i-1 and i
    keys = torch.cat((kvp[:, :-w].view(batch, nb, w, c), kvp[:, w:].view(batch, nb, w, c)), dim=2)
    scores = torch.einsum("bnqhc,bnkc->bhnqk", qb, keys) * scale

    docp = F.pad(doc_ids, (w, pad), value=-1)
    key_doc = torch.cat((docp[:, :-w].view(batch, nb, w), docp[:, w:].view(batch, nb, w)), dim=2)
    query_doc = F.pad(doc_ids, (0, pad), value=-2).view(batch, nb, w)
    qi = torch.arange(w, device=q.device)[:, None]  # query offset inside its block
    ki = torch.arange(2 * w, device=q.device)[None, :] - w  # key offset relative to block start
    in_window = (ki <= qi) & (ki > qi - w)  # [w, 2w]
    allowed = in_window & (key_doc[:, :, None, :] == query_doc[..., None])  # [b, nb, w, 2w]
    scores = scores.masked_fill(~allowed[:, None], MASKED)
    return scores, keys


@fp32_region
def hybrid_attention(q: torch.Tensor, kv: torch.Tensor, doc_ids: torch.Tensor, window: int,
                     sink: torch.Tensor, comp: torch.Tensor | None = None,
                     comp_mask: torch.Tensor | None = None, comp_idx: torch.Tensor | None = None):
    """One softmax over window ∪ compressed entries ∪ sink.

    q `[batch, seq, heads, c]`, kv `[batch, seq, c]`, sink `[heads]`.
    Compressed entries `comp` `[batch, n, c]` are used either densely with `comp_mask`
    `[batch, seq, n]` (HCA, dense CSA) or sparsely through `comp_idx` `[batch, seq, k]` (−1 = none).
    Returns (output `[batch, seq, heads, c]` fp32, compressed-entry probabilities
    `[batch, heads, seq, n or k]` or None — the indexer's training target).
    """
    batch, seq, heads, c = q.shape
    scale = c ** -0.5
    if v4kernels.use_triton(q, kv, sink, comp):
        return _index_list_attention(q, kv, doc_ids, window, sink, scale, comp, comp_mask,
                                     comp_idx)
    qf, kvf = q.float(), kv.float()
    s_win, keys = window_scores(qf, kvf, doc_ids, window, scale)
    nb = s_win.shape[2]
    lse_win = torch.logsumexp(s_win, dim=-1).flatten(2, 3)[..., :seq]  # [batch, heads, seq]
    parts = [lse_win, sink.float()[None, :, None].expand(batch, heads, seq)]

    s_comp = gathered = None
    if comp is not None and comp.shape[1] > 0:
        compf = comp.float()
        if comp_idx is not None:
            gathered = compf.gather(1, comp_idx.clamp(min=0).flatten(1)[..., None].expand(-1, -1, c))
            gathered = gathered.view(batch, seq, -1, c)  # [batch, seq, k, c]
            s_comp = torch.einsum("bshc,bskc->bhsk", qf, gathered) * scale
            s_comp = s_comp.masked_fill((comp_idx < 0)[:, None], MASKED)
        else:
            s_comp = torch.einsum("bshc,bnc->bhsn", qf, compf) * scale
            s_comp = s_comp.masked_fill(~comp_mask[:, None], MASKED)
        parts.append(torch.logsumexp(s_comp, dim=-1))
    lse = torch.logsumexp(torch.stack(parts), dim=0)  # [batch, heads, seq]

    lse_blk = F.pad(lse, (0, nb * window - seq)).view(batch, heads, nb, window, 1)
    p_win = torch.exp(s_win - lse_blk)
    out = torch.einsum("bhnqk,bnkc->bnqhc", p_win, keys).reshape(batch, nb * window, heads, c)
    out = out[:, :seq]
    p_comp = None
    if s_comp is not None:
        p_comp = torch.exp(s_comp - lse[..., None])  # [batch, heads, seq, n|k]
        if gathered is not None:
            out = out + torch.einsum("bhsk,bskc->bshc", p_comp, gathered)
        else:
            out = out + torch.einsum("bhsn,bnc->bshc", p_comp, compf)
    return out, p_comp


def attention_after_lead(q: torch.Tensor, kv: torch.Tensor, doc_ids: torch.Tensor,
                         lead_kv: torch.Tensor, lead_doc: torch.Tensor, window: int,
                         sink: torch.Tensor, comp: torch.Tensor | None = None,
                         comp_mask: torch.Tensor | None = None,
                         comp_idx: torch.Tensor | None = None):
    """`hybrid_attention` for queries whose window reaches back before their first token:
    `lead_kv` `[batch, lead, c]` (document ids `lead_doc` `[batch, lead]`, −1 = none) are the
    keys just before `kv`. They enter as key-only rows (zero queries, no compressed entry) whose
    outputs are dropped, so the blocked window kernel and its memory bound are reused as they
    are, at the cost of `lead` wasted query rows. Used by chunked prefill (the cache's last
    tokens) and context parallelism (the preceding chunk's halo)."""
    lead = lead_kv.shape[1]
    if lead == 0:
        return hybrid_attention(q, kv, doc_ids, window, sink, comp, comp_mask, comp_idx)
    batch, _, heads, c = q.shape
    q = torch.cat((q.new_zeros(batch, lead, heads, c), q), dim=1)
    kv = torch.cat((lead_kv.to(kv.dtype), kv), dim=1)
    doc_ids = torch.cat((lead_doc.to(doc_ids.dtype), doc_ids), dim=1)
    if comp_idx is not None:
        comp_idx = torch.cat((comp_idx.new_full((batch, lead, comp_idx.shape[-1]), -1),
                              comp_idx), dim=1)
    elif comp_mask is not None:
        comp_mask = torch.cat((comp_mask.new_zeros(batch, lead, comp_mask.shape[-1]),
                               comp_mask), dim=1)
    out, p_comp = hybrid_attention(q, kv, doc_ids, window, sink, comp, comp_mask, comp_idx)
    return out[:, lead:], None if p_comp is None else p_comp[:, :, lead:]


def _index_list_attention(q, kv, doc_ids, window, sink, scale, comp, comp_mask, comp_idx):
    """GPU path: the same softmax as one Triton sparse-attention launch over per-query index
    lists into `cat(kv, comp)` (window slots, then compressed entries). The compressed-entry
    probabilities for the indexer target are rebuilt from the kernel's log-sum-exp."""
    seq = q.shape[1]
    has_comp = comp is not None and comp.shape[1] > 0
    table = torch.cat((kv, comp.to(kv.dtype)), dim=1) if has_comp else kv
    idx = v4kernels.hybrid_indices(doc_ids, window, seq, comp_idx=comp_idx if has_comp else None,
                                 comp_mask=comp_mask if has_comp else None)
    out, lse = v4kernels.sparse_attention(q, table, idx, sink, scale, return_lse=True)
    if not has_comp:
        return out, None
    lse = lse.permute(0, 2, 1)[..., None]  # [batch, heads, seq, 1]
    with torch.no_grad():  # the indexer's target is detached anyway
        qf, compf = q.float(), comp.float()
        if comp_idx is not None:
            gathered = compf.gather(1, comp_idx.clamp(min=0).flatten(1)[..., None]
                                    .expand(-1, -1, compf.shape[-1])).view(*comp_idx.shape, -1)
            s = torch.einsum("bshc,bskc->bhsk", qf, gathered) * scale
            valid = (comp_idx >= 0)[:, None]
        else:
            s = torch.einsum("bshc,bnc->bhsn", qf, compf) * scale
            valid = comp_mask[:, None]
        p_comp = torch.exp(s - lse).masked_fill(~valid, 0.0)
    return out, p_comp
