"""One transformer block: mHC around a pre-norm attention sublayer and a pre-norm MoE sublayer.

    (x, post, comb) = hc_pre(X);  X = hc_post(Attention(attn_norm(x)), X, post, comb)
    (x, post, comb) = hc_pre(X);  X = hc_post(MoE(ffn_norm(x)), X, post, comb)

Every block has an MoE FFN; the first `n_hash_layers` route by token id (spec §2, §5.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention, AttentionContext
from .config import ModelConfig
from .mhc import HyperConnectionSite, hc_post, hc_pre
from .moe import MoE
from .norm import RMSNorm


@dataclass
class BlockAux:
    balance_loss: torch.Tensor  # scalar fp32 (unweighted)
    indexer_loss: torch.Tensor  # scalar fp32
    counts: torch.Tensor        # [n_routed_experts]
    routes: torch.Tensor        # [batch, seq, topk]
    live_routes: torch.Tensor | None = None  # the router's own top-k when routes were replayed


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.cfg, self.layer_id = cfg, layer_id
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, layer_id)
        for site in ("attn", "ffn"):
            HyperConnectionSite.create(self, site, cfg.hc_mult, cfg.dim)

    def _site(self, site: str, x: torch.Tensor):
        cfg = self.cfg
        return hc_pre(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                      getattr(self, f"hc_{site}_scale"), cfg.hc_sinkhorn_iters, cfg.hc_eps,
                      cfg.norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, input_ids: torch.Tensor,
                routes: torch.Tensor | None = None, token_mask: torch.Tensor | None = None):
        """x: `[batch, seq, hc, dim]` → (`[batch, seq, hc, dim]`, BlockAux)."""
        h, post, comb = self._site("attn", x)
        a, idx_loss = self.attn(self.attn_norm(h), ctx)
        x = hc_post(a, x, post, comb)
        h, post, comb = self._site("ffn", x)
        moe = self.ffn(self.ffn_norm(h), input_ids, routes=routes, token_mask=token_mask,
                       sequence_sum=None if ctx.shard is None else ctx.shard.cp.all_reduce)
        x = hc_post(moe.out, x, post, comb)
        return x, BlockAux(moe.balance_loss, idx_loss, moe.counts, moe.routes,
                           moe.live_routes)
