"""mHC: manifold-constrained hyper-connections (spec §3).

The residual stream is `hc_mult` parallel streams `[batch, seq, hc, dim]`. Around every sublayer,
per-token coefficients computed from the flattened streams (i) collapse the streams into the
sublayer input (`pre`), (ii) scale the sublayer output into each stream (`post`) and (iii) mix
the old streams through a doubly-stochastic matrix (`comb`, Sinkhorn projection), which keeps
deep stacks non-expansive. Everything here runs in fp32.

Initialisation (the release publishes none; spec §3.6 suggestion): gates α = 0.01, `pre` ≈ 1/hc,
`post` = 1 and `comb` ≈ I, so with the embedding copied into every stream the block starts as a
plain pre-norm residual block: X' = X + F(X).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import v4kernels

from .norm import fp32_region, rms_normalize

GATE_INIT = 0.01
COMB_DIAG_INIT = 4.0  # softmax row weight on the diagonal ≈ 0.95 at hc=4; not saturated


def n_mix(hc: int) -> int:
    """Coefficients per token and site: hc pre + hc post + hc·hc residual."""
    return (2 + hc) * hc


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Doubly-stochastic projection in the official kernel's order: row softmax + eps, a column
    normalisation, then (iters − 1) rounds of row then column normalisation. Ends on columns, so
    every column sums to 1 (each new stream is a convex combination of the old ones)."""
    p = torch.softmax(logits.float(), dim=-1) + eps  # [..., hc, hc]
    p = p / (p.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        p = p / (p.sum(-1, keepdim=True) + eps)
        p = p / (p.sum(-2, keepdim=True) + eps)
    return p


def hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (no weight) of the flattened streams, projected: `[batch, seq, rows of fn]`."""
    flat = x.flatten(-2)  # [batch, seq, hc * dim]
    return rms_normalize(flat, eps) @ fn.float().t()


@fp32_region
def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
           iters: int, hc_eps: float, norm_eps: float):
    """Collapse the streams for a sublayer. x: `[batch, seq, hc, dim]`.

    Returns (sublayer input `[batch, seq, dim]`, post `[batch, seq, hc]`, comb `[b, s, hc, hc]`).
    """
    hc = x.shape[-2]
    m = hc_mixes(x, fn, norm_eps)  # [batch, seq, (2+hc)*hc]
    # pre = sigmoid(α0·m + b) + eps, post = 2·sigmoid(α1·m + b), comb = Sinkhorn(α2·m + b):
    # one Triton launch per site on GPU; `v4kernels.hc_split_sinkhorn_ref` (= `sinkhorn` here)
    pre, post, comb = v4kernels.hc_split_sinkhorn(m, scale.float(), base.float(), hc, iters, hc_eps)
    x_in = torch.einsum("bsj,bsjd->bsd", pre, x.float()).to(x.dtype)
    return x_in, post, comb


@fp32_region
def hc_post(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """X'_k = post_k · F + Σ_j comb[j, k] · X_j (the sum runs over comb's first index)."""
    mixed = torch.einsum("bsjk,bsjd->bskd", comb, x.float())
    return (post[..., None] * f.float()[..., None, :] + mixed).to(x.dtype)


@fp32_region
def hc_head(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse before the output norm: sigmoid-weighted sum of streams (no Sinkhorn)."""
    m = hc_mixes(x, fn, norm_eps)  # [batch, seq, hc]
    pre = torch.sigmoid(scale.float() * m + base.float()) + hc_eps
    return torch.einsum("bsj,bsjd->bsd", pre, x.float()).to(x.dtype)


class HyperConnectionSite(nn.Module):
    """Parameters of one mHC site, registered on the owning module as `hc_{site}_fn/base/scale`
    so checkpoint names match the release (`layers.N.hc_attn_fn`, ...). Holds no parameters
    itself; it is a namespace for creation and initialisation."""

    @staticmethod
    def create(owner: nn.Module, site: str, hc: int, dim: int) -> None:
        owner.register_parameter(f"hc_{site}_fn", nn.Parameter(torch.empty(n_mix(hc), hc * dim)))
        owner.register_parameter(f"hc_{site}_base", nn.Parameter(torch.empty(n_mix(hc))))
        owner.register_parameter(f"hc_{site}_scale", nn.Parameter(torch.empty(3)))

    @staticmethod
    @torch.no_grad()
    def init(owner: nn.Module, site: str, hc: int, std: float, generator: torch.Generator) -> None:
        fn, base, scale = (getattr(owner, f"hc_{site}_{k}") for k in ("fn", "base", "scale"))
        if fn.is_meta:
            return
        fn.copy_(torch.randn(fn.shape, generator=generator) * std)
        scale.fill_(GATE_INIT)
        b = torch.zeros(n_mix(hc))
        b[:hc] = -math.log(hc - 1) if hc > 1 else 0.0  # logit(1/hc): pre ≈ 1/hc
        b[2 * hc:] = (torch.eye(hc) * COMB_DIAG_INIT).flatten()  # comb ≈ I; post: base 0 → 1
        base.copy_(b)


def create_head_collapse(owner: nn.Module, hc: int, dim: int) -> None:
    owner.hc_head_fn = nn.Parameter(torch.empty(hc, hc * dim))
    owner.hc_head_base = nn.Parameter(torch.empty(hc))
    owner.hc_head_scale = nn.Parameter(torch.empty(1))


@torch.no_grad()
def init_head_collapse(owner: nn.Module, hc: int, std: float, generator: torch.Generator) -> None:
    """pre ≈ 1/hc per stream, so the collapse starts as the mean of the (identical) streams."""
    if owner.hc_head_fn.is_meta:
        return
    owner.hc_head_fn.copy_(torch.randn(owner.hc_head_fn.shape, generator=generator) * std)
    owner.hc_head_base.fill_(-math.log(hc - 1) if hc > 1 else 0.0)
    owner.hc_head_scale.fill_(GATE_INIT)
