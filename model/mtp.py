"""Multi-token prediction block (spec §6): position i reads the main model's final streams at i
and the embedding of token i+1, and predicts token i+2.

    e = enorm(embed(token[i+1]));  H = hnorm(X_L) per stream
    X = h_proj(H) + e_proj(e) (broadcast over streams) → Block → collapse → norm → head

Embedding and head are the main model's (passed in, not owned), so the released converter's
"drop the MTP copies" holds. Its block index is n_layers + k, so it is never hash-routed.
"""

from __future__ import annotations

import torch
from torch import nn

from .block import Block
from .config import ModelConfig
from .mhc import create_head_collapse, hc_head
from .norm import RMSNorm


class MTPBlock(Block):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.e_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.h_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        create_head_collapse(self, cfg.hc_mult, cfg.dim)

    def predict(self, streams: torch.Tensor, next_embeds: torch.Tensor, ctx, input_ids,
                head: nn.Module | None, routes=None, token_mask=None):
        """streams `[batch, seq, hc, dim]` (main model's last block), next_embeds `[batch, seq,
        dim]` (embedding of token i+1) → (logits `[batch, seq, vocab]`, BlockAux); with
        `head=None`, the normed head input `[batch, seq, dim]` instead of the logits."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(next_embeds))[:, :, None]
        x, aux = self(x, ctx, input_ids, routes=routes, token_mask=token_mask)
        cfg = self.cfg
        y = hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, cfg.hc_eps,
                    cfg.norm_eps)
        y = self.norm(y)
        return (y if head is None else head(y)), aux
