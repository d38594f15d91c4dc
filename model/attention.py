"""Hybrid attention layer: SWA, CSA or HCA by `compress_ratios[layer_id]` (spec §4).

Shared by all kinds: low-rank queries (`wq_a` → `q_norm` → `wq_b`) with a weightless per-head RMS
norm, one shared K=V head (`wkv` → `kv_norm`), partial interleaved RoPE on the last
`rope_head_dim` channels, a learned attention sink, de-rotation of the output's RoPE channels at
the query position, and a grouped output projection (`wo_a` as `o_groups` block-diagonal maps,
then `wo_b`). CSA adds an overlapped ratio-4 compressor and the lightning indexer; HCA a
non-overlapped compressor attended densely.

Not modelled here (inference/QAT only, documented choice): the FP8 fake-quant of the KV nope
channels and the FP4/Hadamard path of the indexer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .attention_core import hybrid_attention
from .cache import CacheStep, ModelCache
from .cached_attention import cached_forward
from .compressor import BlockLayout, Compressor
from .config import CSA_RATIO, ModelConfig
from .context_parallel import SequenceShard
from .cp_attention import cp_forward
from .indexer import Indexer, indexer_kl_terms
from .norm import RMSNorm, rms_normalize
from .rope import apply_rope


@dataclass
class AttentionContext:
    """Per-forward data every attention layer needs, built once by the transformer."""

    doc_ids: torch.Tensor    # [batch, seq]
    positions: torch.Tensor  # [batch, seq]
    freqs: dict[bool, torch.Tensor]  # compressed? -> RoPE frequencies
    csa_mode: str = "sparse"
    indexer_loss: bool = False
    cache: ModelCache | None = None  # incremental decoding (see cached_attention.py)
    step: CacheStep | None = None    # where this forward's tokens go in `cache`
    # context parallelism: this rank's chunks of whole rows (doc_ids and positions above are
    # then the local tokens'; see cp_attention.py)
    shard: SequenceShard | None = None
    _layouts: dict[int, tuple[BlockLayout, torch.Tensor]] = field(default_factory=dict)

    def layout(self, ratio: int) -> tuple[BlockLayout, torch.Tensor]:
        """Block layout and query visibility `[batch, seq, n]` for `ratio`, computed once."""
        if ratio not in self._layouts:
            layout = BlockLayout.build(self.doc_ids, self.positions, ratio)
            self._layouts[ratio] = (layout, layout.visible(self.doc_ids))
        return self._layouts[ratio]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.kind = cfg.layer_kind(layer_id)
        self.ratio = cfg.compress_ratios[layer_id]
        h, c, g = cfg.n_heads, cfg.head_dim, cfg.o_groups
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, h * c, bias=False)
        self.wkv = nn.Linear(cfg.dim, c, bias=False)
        self.kv_norm = RMSNorm(c, cfg.norm_eps)
        self.wo_a = nn.Linear(h * c // g, g * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(g * cfg.o_lora_rank, cfg.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(h))
        if self.ratio:
            self.compressor = Compressor(cfg.dim, c, self.ratio, overlap=self.kind == "csa",
                                         norm_eps=cfg.norm_eps)
        if self.kind == "csa":
            self.indexer = Indexer(cfg.dim, cfg.q_lora_rank, cfg.index_n_heads,
                                   cfg.index_head_dim, CSA_RATIO, cfg.norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """x: `[batch, seq, dim]` (normed) → (output `[batch, seq, dim]`, indexer KL loss)."""
        if ctx.cache is not None:
            return cached_forward(self, x, ctx), x.new_zeros((), dtype=torch.float32)
        if ctx.shard is not None:
            return cp_forward(self, x, ctx)
        cfg = self.cfg
        freqs = ctx.freqs[self.ratio > 0]
        q_latent, q, kv = self.project_qkv(x, ctx.positions, freqs)

        comp = comp_mask = comp_idx = index_scores = None
        if self.ratio:
            layout, visible = ctx.layout(self.ratio)
            comp = self.compressor(x, layout, freqs)  # [batch, n, c]
            comp_mask = visible
            if self.kind == "csa" and (ctx.csa_mode == "sparse" or ctx.indexer_loss):
                index_scores = self.indexer.scores(x.detach(), q_latent.detach(), ctx.positions,
                                                   layout, visible, freqs)
                if ctx.csa_mode == "sparse":
                    comp_idx = self.indexer.select(index_scores, visible, cfg.index_topk)
                    comp_mask = None

        out, p_comp = hybrid_attention(q, kv, ctx.doc_ids, cfg.window_size, self.attn_sink,
                                       comp, comp_mask, comp_idx)
        idx_loss = x.new_zeros((), dtype=torch.float32)
        if ctx.indexer_loss and index_scores is not None and p_comp is not None:
            total, count = indexer_kl_terms(p_comp, index_scores, comp_idx, comp_mask)
            idx_loss = total / count.clamp_min(1)

        out = apply_rope(out, ctx.positions, freqs, inverse=True).to(x.dtype)
        return self.project_out(out), idx_loss

    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor):
        """x `[batch, seq, dim]` → (q latent `[batch, seq, q_lora]`, q `[batch, seq, heads, c]`
        per-head normalised and rotated, shared K=V `[batch, seq, c]` rotated)."""
        cfg = self.cfg
        batch, seq, _ = x.shape
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).view(batch, seq, cfg.n_heads, cfg.head_dim)
        q = rms_normalize(q, cfg.norm_eps).to(x.dtype)  # per-head, no weight
        q = apply_rope(q, positions, freqs)
        kv = apply_rope(self.kv_norm(self.wkv(x)), positions, freqs)
        return q_latent, q, kv

    def project_out(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped output: `o_groups` independent maps of (heads/g · c) → o_lora_rank, then wo_b."""
        cfg = self.cfg
        batch, seq = o.shape[:2]
        g = cfg.o_groups
        o = o.reshape(batch, seq, g, -1)  # [batch, seq, g, heads/g * c]
        wo_a = self.wo_a.weight.view(g, cfg.o_lora_rank, -1)  # [g, o_lora, heads/g * c]
        o = torch.einsum("bsgi,gri->bsgr", o, wo_a).flatten(2)  # [batch, seq, g * o_lora]
        return self.wo_b(o)
