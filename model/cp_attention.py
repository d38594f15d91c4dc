"""The attention layer's context-parallel forward: same modules, same math as `Attention.forward`.

`Attention.forward` calls `cp_forward` when the context carries a `SequenceShard`
(`model/context_parallel.py`). This rank's tokens are two chunks of every row; attention runs on
them as `2·batch` rows of one chunk each:
- queries and the chunk's own K=V come from the layer's `project_qkv` on local tokens;
- the sliding window's `window − 1` keys before each chunk arrive as a halo and enter
  `attention_after_lead` as key-only rows;
- compressed entries (main and indexer compressors) are built in two stages: the compressor's
  projections of the 2m (CSA) or m (HCA) tokens before each chunk arrive as a halo, this rank
  pools the blocks whose last token it holds, and an all-gather rebuilds every entry in order;
- the indexer scores local queries against all entries and picks its top-k; its KL loss is
  returned as this rank's share (local sum / the group's count), so the shares of a CP group add
  up to the loss of the whole rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .attention_core import attention_after_lead
from .compressor import Compressor
from .context_parallel import SequenceShard
from .indexer import indexer_kl_terms
from .rope import apply_rope

if TYPE_CHECKING:
    from .attention import Attention, AttentionContext


def cp_forward(attn: "Attention", x: torch.Tensor, ctx: "AttentionContext"):
    """x `[batch, 2·chunk, dim]` (this rank's tokens, normed) → (`[batch, 2·chunk, dim]`,
    indexer KL share)."""
    cfg, shard = attn.cfg, ctx.shard
    w = cfg.window_size
    freqs = ctx.freqs[attn.ratio > 0]
    q_latent, q, kv = attn.project_qkv(x, ctx.positions, freqs)
    lead_kv = shard.halo(kv, w - 1)  # [2·batch, w-1, c]

    comp = comp_mask = comp_idx = index_scores = None
    if attn.ratio:
        layout, visible, owned = shard.layout(attn.ratio)  # visible [2·batch, chunk, n]
        comp = compress(attn.compressor, x, shard, freqs)   # [2·batch, n, c]
        comp_mask = visible
        if attn.kind == "csa" and (ctx.csa_mode == "sparse" or ctx.indexer_loss):
            iq, iw = attn.indexer.queries(x.detach(), q_latent.detach(), ctx.positions, freqs)
            keys = compress(attn.indexer.compressor, x.detach(), shard, freqs).float()
            index_scores = attn.indexer.score_keys(shard.rows(iq), shard.rows(iw), keys, visible)
            if ctx.csa_mode == "sparse":
                comp_idx = attn.indexer.select(index_scores, visible, cfg.index_topk)
                comp_mask = None

    out, p_comp = attention_after_lead(shard.rows(q), shard.rows(kv), shard.rows(ctx.doc_ids),
                                       lead_kv, shard.halo_doc_ids(w - 1), w, attn.attn_sink,
                                       comp, comp_mask, comp_idx)
    idx_loss = x.new_zeros((), dtype=torch.float32)
    if ctx.indexer_loss and index_scores is not None and p_comp is not None:
        total, count = indexer_kl_terms(p_comp, index_scores, comp_idx, comp_mask)
        count = shard.cp.all_reduce(count.detach().float())
        idx_loss = total / count.clamp_min(1)
    out = apply_rope(shard.unrows(out), ctx.positions, freqs, inverse=True).to(x.dtype)
    return attn.project_out(out), idx_loss


def compress(comp: Compressor, x: torch.Tensor, shard: SequenceShard,
             freqs: torch.Tensor) -> torch.Tensor:
    """Every compressed entry of the rows, for each local chunk row `[2·batch, n, c]`.

    Stage 1: the 2m (overlapped) or m tokens of projections before each chunk arrive as a halo,
    so the blocks ending in a chunk are pooled whole where their last token is. Stage 2: the
    all-gather and select in `SequenceShard.gather_entries`."""
    layout, _, owned = shard.layout(comp.ratio)
    lead = 2 * comp.ratio if comp.overlap else comp.ratio
    kv, gate = comp.project(x)  # [batch, 2·chunk, coff·c] fp32
    ext_kv = torch.cat((shard.halo(kv, lead), shard.rows(kv)), dim=1)  # [2·batch, lead+chunk, .]
    ext_gate = torch.cat((shard.halo(gate, lead), shard.rows(gate)), dim=1)
    local = owned.local_layout(shard, layout, lead)
    own = comp.pool(ext_kv, ext_gate, local, freqs, x.dtype)  # [2·batch, E, c]
    return shard.gather_entries(own, owned)
