"""KV compression for CSA and HCA (spec §4.4), document-aware.

A compressor turns every complete block of `ratio` consecutive tokens of one document into one
entry: a per-channel softmax over the block (gate logits + a learned positional bias `ape`)
weights the tokens' projected KV. CSA's compressor (ratio 4) is *overlapped*: an entry also pools
the previous block through the first half of a 2c-wide projection, so neighbouring entries share
tokens. Blocks are aligned to each document's start (positions restart per document), a
document's tail shorter than `ratio` makes no entry, and an entry is visible to query t only once
its last token is at or before t in the same document.

`BlockLayout` describes where the blocks are in a packed batch; it is computed once per forward
and ratio and shared by every layer (and the indexer) using that ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm, fp32_region
from .rope import apply_rope


@dataclass
class BlockLayout:
    ratio: int
    start: torch.Tensor     # [batch, n_entries] token index of each block's first token
    valid: torch.Tensor     # [batch, n_entries] bool (False: padding slot)
    has_prev: torch.Tensor  # [batch, n_entries] bool (the block has a predecessor in its document)
    position: torch.Tensor  # [batch, n_entries] in-document position of the first token (RoPE)
    doc: torch.Tensor       # [batch, n_entries] document id

    @property
    def n_entries(self) -> int:
        return self.start.shape[1]

    @property
    def end(self) -> torch.Tensor:
        return self.start + self.ratio - 1

    def visible(self, doc_ids: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """`[batch, q, n_entries]` bool: entry usable by each query (complete, causal, same doc).
        Queries are every token of `doc_ids` `[batch, seq]`, or the token indices `queries` `[q]`
        (a context-parallel rank's own tokens)."""
        t = torch.arange(doc_ids.shape[1], device=doc_ids.device) if queries is None else queries
        return (self.valid[:, None, :] & (self.end[:, None, :] <= t[None, :, None])
                & (self.doc[:, None, :] == doc_ids[:, t, None]))

    @classmethod
    def build(cls, doc_ids: torch.Tensor, positions: torch.Tensor, ratio: int) -> "BlockLayout":
        batch, seq = doc_ids.shape
        t = torch.arange(seq, device=doc_ids.device)
        last = (t + ratio - 1).clamp(max=seq - 1)
        is_start = ((positions % ratio == 0) & (t + ratio - 1 < seq)
                    & (doc_ids[:, last] == doc_ids))  # [batch, seq]
        n = int(is_start.sum(1).max()) if seq else 0
        # stable order: block starts first, in sequence order
        key = torch.where(is_start, t, t + seq)
        start = key.argsort(dim=1)[:, :n]
        valid = is_start.gather(1, start)
        position = positions.gather(1, start)
        return cls(ratio=ratio, start=start, valid=valid, has_prev=valid & (position >= ratio),
                   position=position, doc=doc_ids.gather(1, start))


class Compressor(nn.Module):
    """One compressor: `wkv`/`wgate` (d → coff·c), `ape` [ratio, coff·c], `norm` RMSNorm(c).
    Projections and the softmax run in fp32, as in the reference."""

    def __init__(self, dim: int, head_dim: int, ratio: int, overlap: bool, norm_eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        coff = 2 if overlap else 1
        self.wkv = nn.Linear(dim, coff * head_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * head_dim, bias=False)
        self.ape = nn.Parameter(torch.empty(ratio, coff * head_dim))
        self.norm = RMSNorm(head_dim, norm_eps)

    def forward(self, x: torch.Tensor, layout: BlockLayout, freqs: torch.Tensor) -> torch.Tensor:
        """x: `[batch, seq, dim]` → entries `[batch, n_entries, head_dim]` (RoPE applied)."""
        kv, gate = self.project(x)
        return self.pool(kv, gate, layout, freqs, x.dtype)

    @fp32_region
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[batch, seq, dim]` → (kv, gate logits) fp32 `[batch, seq, coff*c]`, `ape` not yet
        added. Split from `pool` so the inference cache can keep the projections of a
        not-yet-complete block and pool it once its last token arrives."""
        xf = x.float()
        return F.linear(xf, self.wkv.weight.float()), F.linear(xf, self.wgate.weight.float())

    @fp32_region
    def pool(self, kv: torch.Tensor, gate: torch.Tensor, layout: BlockLayout, freqs: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
        """Projected tokens `[batch, seq, coff*c]` (fp32) → entries `[batch, n_entries, c]` in
        `dtype`, one per block of `layout` (start indices index the `seq` axis; RoPE at
        `layout.position`)."""
        seq = kv.shape[1]
        c, m = self.head_dim, self.ratio
        offsets = torch.arange(m, device=kv.device)
        ape = self.ape.float()

        def gather_blocks(first: torch.Tensor):  # first: [batch, n]
            idx = (first[..., None] + offsets).clamp(0, seq - 1).flatten(1)  # [batch, n*m]
            take = lambda t: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
            return (take(kv).unflatten(1, (first.shape[1], m)),
                    take(gate).unflatten(1, (first.shape[1], m)) + ape)  # [batch, n, m, coff*c]

        kv_blk, z_blk = gather_blocks(layout.start)
        if self.overlap:
            kv_prev, z_prev = gather_blocks(layout.start - m)
            hide = ~layout.has_prev[..., None, None]
            kv_prev = kv_prev[..., :c].masked_fill(hide, 0.0)
            z_prev = z_prev[..., :c].masked_fill(hide, float("-inf"))
            kv_blk = torch.cat((kv_prev, kv_blk[..., c:]), dim=2)  # [batch, n, 2m, c]
            z_blk = torch.cat((z_prev, z_blk[..., c:]), dim=2)
        weights = torch.softmax(z_blk, dim=2)  # per channel over the pooled tokens
        entries = (weights * kv_blk).sum(2)  # [batch, n, c]
        entries = self.norm(entries)
        return apply_rope(entries, layout.position, freqs).to(dtype)
