"""The attention layer's incremental (cached) forward: same modules, same math as training.

`Attention.forward` calls `cached_forward` when the context carries a `ModelCache`. The new
tokens of every row (positions `step.positions`, possibly different per row) are projected by
the layer's own `project_qkv`, compressed by its own `Compressor.project`/`pool` (over the
cached tail plus the new tokens, laid out as a `BlockLayout` by `tail_layout`), scored by its own
`Indexer.queries`/`score_keys` and top-k `select`, and attended with one softmax over
window ∪ compressed entries ∪ sink:
- chunks of at most `window_size` tokens (decode) use `attend_lists` below: per-query index
  lists over the ring's `window` keys, the chunk and the entries, for the shared
  `v4kernels.sparse_attention` (the kernel training's `hybrid_attention` uses on GPU);
- longer chunks (prefill) go through the training kernel `hybrid_attention`, with the last
  `window − 1` cached tokens prepended as key-only rows, so memory stays linear in the chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

import v4kernels

from .attention_core import attention_after_lead
from .cache import CacheStep, CompressorState, LayerCache
from .compressor import BlockLayout, Compressor
from .indexer import Indexer
from .rope import apply_rope

if TYPE_CHECKING:
    from .attention import Attention, AttentionContext


def cached_forward(attn: "Attention", x: torch.Tensor, ctx: "AttentionContext") -> torch.Tensor:
    """x `[batch, seq, dim]` (normed) → `[batch, seq, dim]`; reads and appends to the layer cache."""
    cfg, step = attn.cfg, ctx.step
    cache: LayerCache = ctx.cache.layers[attn.layer_id]
    freqs = ctx.freqs[attn.ratio > 0]
    q_latent, q, kv = attn.project_qkv(x, step.positions, freqs)

    comp = comp_mask = comp_idx = None
    if attn.ratio:
        n = step.n_entries[attn.ratio]
        append_entries(attn.compressor, x, cache.state, cache.entries, step, freqs)
        comp, comp_mask = cache.entries[:, :n], step.entry_visibility(attn.ratio)
        if attn.kind == "csa":  # keys kept in both modes, so switching csa_mode stays exact
            append_entries(attn.indexer.compressor, x, cache.index_state, cache.index_keys,
                           step, freqs)
            if ctx.csa_mode == "sparse":
                qi, w = attn.indexer.queries(x, q_latent, step.positions, freqs)
                keys = cache.index_keys[:, :n].float()  # [batch, n, d]
                scores = attn.indexer.score_keys(qi, w, keys, comp_mask)
                comp_idx, comp_mask = Indexer.select(scores, comp_mask, cfg.index_topk), None

    keys, key_pos, key_ok = window_keys(cache.window, kv, step)
    if x.shape[1] <= cfg.window_size:
        q_pos = step.positions[..., None]  # [batch, seq, 1]
        mask = key_ok[:, None, :] & (key_pos[:, None, :] <= q_pos) & (
            key_pos[:, None, :] > q_pos - cfg.window_size)  # [batch, seq, keys]
        out = attend_lists(attn, q, keys, mask, comp, comp_mask, comp_idx)
    else:
        out = _attend_blocked(attn, q, keys, key_ok, step, comp, comp_mask, comp_idx)
    write_ring(cache.window, kv, step)

    out = apply_rope(out, step.positions, freqs, inverse=True).to(x.dtype)
    return attn.project_out(out)


# ---------------------------------------------------------------------- window
def window_keys(ring: torch.Tensor, kv: torch.Tensor, step: CacheStep):
    """The ring's last `window` positions before the chunk, in position order, then the chunk.

    Returns (keys `[batch, window + seq, c]`, their positions `[batch, window + seq]`, usable
    `[batch, window + seq]` bool: position >= 0 and, for chunk tokens, real)."""
    w = ring.shape[1] - 1
    prev_pos = step.start[:, None] - w + torch.arange(w, device=kv.device)  # [batch, w]
    prev = ring.gather(1, (prev_pos % w)[..., None].expand(-1, -1, ring.shape[-1]))
    keys = torch.cat((prev, kv.to(ring.dtype)), dim=1)
    return (keys, torch.cat((prev_pos, step.positions), dim=1),
            torch.cat((prev_pos >= 0, step.valid), dim=1))


def write_ring(ring: torch.Tensor, values: torch.Tensor, step: CacheStep) -> None:
    """Stores each row's real new tokens among its last `size` positions at slot pos % size;
    everything else goes to the trailing sink slot. ring `[batch, size + 1, width]`."""
    slot = step.ring_slots(ring.shape[1] - 1)  # [batch, seq]
    ring.scatter_(1, slot[..., None].expand(-1, -1, ring.shape[-1]), values.to(ring.dtype))


# ---------------------------------------------------------------------- compression
def append_entries(comp: Compressor, x: torch.Tensor, state: CompressorState,
                   store: torch.Tensor, step: CacheStep, freqs: torch.Tensor) -> None:
    """Pools every block that the chunk completes and writes entry s to `store[:, s]`, then keeps
    the projections of the last `coff·ratio` positions in `state` for later blocks.

    The cached tail (positions start − size … start − 1, the previous block's first-half
    projections included for CSA) and the new tokens form one short sequence; `tail_layout`
    lays out its blocks as training does (aligned to position 0, complete, real tokens only)
    and `Compressor.pool` pools them. Only blocks ending at or after `start` are new; when no
    row has one (`step.completes`, known on the host) the pooling is skipped."""
    kv, gate = comp.project(x)  # [batch, seq, coff*c] fp32
    if step.completes[comp.ratio]:  # else no row finishes a block: only the tail state changes
        _pool_new_blocks(comp, kv, gate, state, store, step, freqs)
    write_ring(state.kv, kv, step)
    write_ring(state.gate, gate, step)


def _pool_new_blocks(comp: Compressor, kv: torch.Tensor, gate: torch.Tensor,
                     state: CompressorState, store: torch.Tensor, step: CacheStep,
                     freqs: torch.Tensor) -> None:
    """Pools the blocks of [cached tail, chunk] and writes the new ones' entries to `store`."""
    m, size = comp.ratio, state.size
    prev_pos = step.start[:, None] - size + torch.arange(size, device=kv.device)  # [batch, size]
    slot = (prev_pos % size)[..., None].expand(-1, -1, kv.shape[-1])
    ext_kv = torch.cat((state.kv.gather(1, slot), kv), dim=1)  # [batch, size + seq, coff*c]
    ext_gate = torch.cat((state.gate.gather(1, slot), gate), dim=1)
    layout = tail_layout(step, m, size)
    entries = comp.pool(ext_kv, ext_gate, layout, freqs, store.dtype)  # [batch, n, c]
    new = layout.valid & (layout.position + m - 1 >= step.start[:, None])
    idx = torch.where(new, torch.div(layout.position, m, rounding_mode="floor"),
                      store.shape[1] - 1)  # the sink slot for everything else
    store.scatter_(1, idx[..., None].expand(-1, -1, store.shape[-1]), entries)


def tail_layout(step: CacheStep, m: int, size: int) -> BlockLayout:
    """Blocks of the sequence [cached tail of `size` positions, chunk], in closed form (a fixed
    number of candidates, no host sync): candidate j starts at the j-th multiple of m at or
    after position start − size, and is valid when all its tokens are known and real, i.e. its
    first position is >= 0 and its last token is a real one inside the sequence."""
    seq = step.positions.shape[1]
    length = size + seq
    n = length // m + 1
    first = step.start - size  # [batch] position of sequence index 0
    base = torch.div(first + m - 1, m, rounding_mode="floor") * m  # first multiple of m
    position = base[:, None] + m * torch.arange(n, device=first.device)  # [batch, n]
    start = position - first[:, None]  # sequence index of each block's first token
    last = start + m - 1
    real = torch.cat((torch.ones_like(step.valid[:, :1]).expand(-1, size), step.valid), dim=1)
    valid = (position >= 0) & (last < length) & real.gather(1, last.clamp(max=length - 1))
    return BlockLayout(ratio=m, start=start.clamp(max=length - 1), valid=valid,
                       has_prev=valid & (position >= m), position=position,
                       doc=torch.zeros_like(position))


# ---------------------------------------------------------------------- attention
def attend_lists(attn: "Attention", q: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
                 comp: torch.Tensor | None, comp_mask: torch.Tensor | None,
                 comp_idx: torch.Tensor | None) -> torch.Tensor:
    """Short chunks: one softmax over explicit window keys ∪ compressed entries ∪ sink, as index
    lists into `cat(keys, comp)` for the shared sparse-attention kernel (Triton on GPU, its
    gather reference elsewhere).

    q `[batch, seq, heads, c]`, keys `[batch, k, c]` usable where `key_mask` `[batch, seq, k]`;
    compressed entries as in `hybrid_attention` (`comp` `[batch, n, c]` with `comp_mask`
    `[batch, seq, n]`, or `comp_idx` `[batch, seq, topk]`, −1 = none). → `[batch, seq, heads,
    c]` fp32."""
    n_keys = keys.shape[1]
    rows = torch.arange(n_keys, device=q.device)
    lists = [torch.where(key_mask, rows, -1)]  # [batch, seq, k]
    table = keys
    if comp is not None and comp.shape[1] > 0:
        table = torch.cat((keys, comp.to(keys.dtype)), dim=1)  # [batch, k + n, c]
        if comp_idx is not None:
            lists.append(torch.where(comp_idx >= 0, comp_idx + n_keys, -1))
        else:
            entries = torch.arange(n_keys, n_keys + comp.shape[1], device=q.device)
            lists.append(torch.where(comp_mask, entries, -1))
    return v4kernels.sparse_attention(q, table, torch.cat(lists, dim=-1), attn.attn_sink,
                                    q.shape[-1] ** -0.5)


def _attend_blocked(attn: "Attention", q: torch.Tensor, keys: torch.Tensor,
                    key_ok: torch.Tensor, step: CacheStep, comp, comp_mask, comp_idx):
    """Long chunks through the training kernel: the ring's last window − 1 tokens become
    key-only rows in front (skipped on a fresh prefill), marked as another document where
    unknown (position < 0)."""
    w = attn.cfg.window_size
    batch, seq = q.shape[:2]
    lead = 0 if step.fresh else w - 1
    lead_kv = keys[:, w - lead:w]  # [batch, lead, c]: the ring's last lead positions
    lead_doc = torch.where(key_ok[:, w - lead:w], 0, -1)
    kv = keys[:, w:]  # [batch, seq, c]: the chunk
    doc = torch.zeros(batch, seq, dtype=torch.long, device=q.device)
    out, _ = attention_after_lead(q, kv, doc, lead_kv, lead_doc, w, attn.attn_sink, comp,
                                  comp_mask, comp_idx)
    return out
