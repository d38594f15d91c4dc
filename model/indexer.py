"""Lightning indexer for CSA layers (spec §4.5): picks, per query, the top-k compressed entries.

I(t, s) = Σ_h w(t, h) · ReLU(q(t, h) · K(s)), with 128-d (Flash) queries from the shared query
latent, keys from the indexer's own overlapped ratio-4 compressor, and per-head weights from
`weights_proj`. The Hadamard rotation and FP4 fake-quant of the release only matter for
quantised inference (an orthogonal rotation leaves dot products unchanged), so the training path
computes the same scores without them.

Training (V3.2-style, spec §4.5): the indexer's inputs are detached, so it learns only from its
own KL loss and the model only from the LM loss; selection itself is non-differentiable.
The KL target is the main attention's probability over compressed entries, summed over heads
and renormalised over the compressed entries (window and sink mass excluded: the indexer only
chooses among compressed entries, so only their relative mass is a target). In dense mode the KL
runs over all visible entries; in sparse mode over the selected set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention_core import MASKED
from .compressor import BlockLayout, Compressor
from .norm import fp32_region
from .rope import apply_rope

# Queries per chunk are chosen so one chunk's [chunk, heads, entries] tensor stays this small.
CHUNK_ELEMENTS = 1 << 24


class Indexer(nn.Module):
    def __init__(self, dim: int, q_lora_rank: int, n_heads: int, head_dim: int, ratio: int,
                 norm_eps: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dim, n_heads, bias=False)
        self.compressor = Compressor(dim, head_dim, ratio, overlap=True, norm_eps=norm_eps)

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor,
               layout: BlockLayout, visible: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """Index scores `[batch, seq, n_entries]` fp32, MASKED where not visible."""
        q, w = self.queries(x, q_latent, positions, freqs)
        keys = self.compressor(x, layout, freqs).float()  # [batch, n, d]
        return self.score_keys(q, w, keys, visible)

    def queries(self, x: torch.Tensor, q_latent: torch.Tensor, positions: torch.Tensor,
                freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries `[batch, seq, heads, d]` fp32 rotated, head weights `[batch, seq, heads]` fp32
        with the 1/sqrt(d·heads) scale folded in)."""
        batch, seq, _ = x.shape
        q = self.wq_b(q_latent).view(batch, seq, self.n_heads, self.head_dim)
        q = apply_rope(q, positions, freqs).float()  # [batch, seq, heads, d]
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w

    @fp32_region
    def score_keys(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                   visible: torch.Tensor) -> torch.Tensor:
        """Queries/weights from `queries` against compressed keys `[batch, n, d]` (fp32) →
        `[batch, seq, n]`, MASKED where `visible` `[batch, seq, n]` is False. Chunked over
        queries (and recomputed in backward) so no `[seq, heads, n]` tensor is whole."""
        batch, seq = q.shape[:2]
        n = keys.shape[1]
        chunk = seq if torch.compiler.is_compiling() else \
            max(1, CHUNK_ELEMENTS // max(1, batch * self.n_heads * n))  # compiled: no guard
        outs = []
        for s0 in range(0, seq, chunk):
            args = (q[:, s0:s0 + chunk], w[:, s0:s0 + chunk], keys)
            if torch.is_grad_enabled() and q.requires_grad:
                outs.append(checkpoint(_chunk_scores, *args, use_reentrant=False))
            else:
                outs.append(_chunk_scores(*args))
        scores = torch.cat(outs, dim=1) if outs else q.new_zeros(batch, seq, n)
        return scores.masked_fill(~visible, MASKED)

    @staticmethod
    def select(scores: torch.Tensor, visible: torch.Tensor, topk: int) -> torch.Tensor:
        """Top-k entry ids `[batch, seq, k]`, −1 where fewer than k entries are visible.

        Ties (common: ReLU makes many scores exactly 0) go to the most recent entry, through a
        stable sort, so the choice never depends on how many other documents share the row."""
        n = scores.shape[-1]
        k = min(topk, n)
        order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :k]
        idx = n - 1 - order
        return torch.where(visible.gather(-1, idx), idx, torch.full_like(idx, -1))


def _chunk_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    logits = torch.einsum("bshd,bnd->bshn", q, keys).relu_()  # [batch, chunk, heads, n]
    return torch.einsum("bshn,bsh->bsn", logits, w)


def indexer_kl(attn_probs: torch.Tensor, index_scores: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target ‖ softmax(index scores)) on the candidate entries.

    attn_probs `[batch, heads, seq, n]` (main attention, any scale; detached here),
    index_scores `[batch, seq, n]`, mask `[batch, seq, n]` (candidate entries). Queries with no
    candidate are skipped.
    """
    total, count = _kl_sum(attn_probs, index_scores, mask)
    return total / count.clamp_min(1)


def indexer_kl_terms(p_comp: torch.Tensor, index_scores: torch.Tensor,
                     comp_idx: torch.Tensor | None, comp_mask: torch.Tensor | None):
    """(KL summed over queries, number of queries with a candidate) for one attention call:
    sparse (`comp_idx`, −1 = none) over the selected entries, dense over every visible one.
    A mean is their ratio; context parallelism divides by the whole group's count instead."""
    if comp_idx is not None:
        return _kl_sum(p_comp, index_scores.gather(-1, comp_idx.clamp(min=0)), comp_idx >= 0)
    return _kl_sum(p_comp, index_scores, comp_mask)


def _kl_sum(attn_probs: torch.Tensor, index_scores: torch.Tensor, mask: torch.Tensor):
    target = attn_probs.detach().float().sum(1).masked_fill(~mask, 0.0)  # [batch, seq, n]
    total = target.sum(-1, keepdim=True)
    has = mask.any(-1) & (total.squeeze(-1) > 0)
    target = target / total.clamp_min(1e-30)
    log_q = F.log_softmax(index_scores.masked_fill(~mask, MASKED), dim=-1)
    kl = (target * (target.clamp_min(1e-30).log() - log_q)).masked_fill(~mask, 0.0).sum(-1)
    return (kl * has).sum(), has.sum()
