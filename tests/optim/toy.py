"""Test models: a module tree with DeepSeek-V4's parameter names, and a tiny trainable net.

`v4_tree(cfg)` rebuilds only the *names and shapes* of the reference checkpoint (no forward), so
the grouping rules can be tested without the real model. `expected_adamw(cfg)` lists, from the
documented rule (embedding, head, RMSNorm weights, mHC base/scale, 1-D tensors, `ape`), the
names that must end in AdamW; it is written independently of `optim.groups`.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
import torch.nn.functional as F


def _p(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


def _mod(**params: nn.Parameter) -> nn.Module:
    m = nn.Module()
    for k, v in params.items():
        setattr(m, k, v)
    return m


def _compressor(dim: int, head_dim: int, ratio: int, overlap: bool) -> nn.Module:
    coff = 2 if overlap else 1
    m = nn.Module()
    m.wkv = _mod(weight=_p(coff * head_dim, dim))
    m.wgate = _mod(weight=_p(coff * head_dim, dim))
    m.ape = _p(ratio, coff * head_dim)
    m.norm = _mod(weight=_p(head_dim))
    return m


def _block(cfg, layer_id: int) -> nn.Module:
    d, h, c, g, hc = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.o_groups, cfg.hc_mult
    kind = cfg.layer_kind(layer_id)
    b = nn.Module()
    b.attn_norm = _mod(weight=_p(d))
    b.ffn_norm = _mod(weight=_p(d))
    a = nn.Module()
    a.wq_a = _mod(weight=_p(cfg.q_lora_rank, d))
    a.q_norm = _mod(weight=_p(cfg.q_lora_rank))
    a.wq_b = _mod(weight=_p(h * c, cfg.q_lora_rank))
    a.wkv = _mod(weight=_p(c, d))
    a.kv_norm = _mod(weight=_p(c))
    a.wo_a = _mod(weight=_p(g * cfg.o_lora_rank, h * c // g))
    a.wo_b = _mod(weight=_p(d, g * cfg.o_lora_rank))
    a.attn_sink = _p(h)
    ratio = cfg.compress_ratios[layer_id]
    if kind != "swa":
        a.compressor = _compressor(d, c, ratio, overlap=kind == "csa")
    if kind == "csa":
        ix = nn.Module()
        ix.wq_b = _mod(weight=_p(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank))
        ix.weights_proj = _mod(weight=_p(cfg.index_n_heads, d))
        ix.compressor = _compressor(d, cfg.index_head_dim, ratio, overlap=True)
        a.indexer = ix
    b.attn = a
    f = nn.Module()
    f.gate = _mod(weight=_p(cfg.n_routed_experts, d))
    f.gate.register_buffer("bias", torch.zeros(cfg.n_routed_experts))
    e, i = cfg.n_routed_experts, cfg.moe_inter_dim
    f.experts = _mod(w1=_p(e, i, d), w3=_p(e, i, d), w2=_p(e, d, i))
    f.shared_experts = _mod()
    for n, shape in (("w1", (i, d)), ("w3", (i, d)), ("w2", (d, i))):
        setattr(f.shared_experts, n, _mod(weight=_p(*shape)))
    b.ffn = f
    mix = (2 + hc) * hc
    for site in ("attn", "ffn"):
        b.register_parameter(f"hc_{site}_fn", _p(mix, hc * d))
        b.register_parameter(f"hc_{site}_base", _p(mix))
        b.register_parameter(f"hc_{site}_scale", _p(3))
    return b


def v4_tree(cfg) -> nn.Module:
    """Parameters named and shaped like the reference checkpoint (build under meta device)."""
    d, hc = cfg.dim, cfg.hc_mult
    root = nn.Module()
    root.embed = _mod(weight=_p(cfg.vocab_size, d))
    root.layers = nn.ModuleList(_block(cfg, i) for i in range(cfg.n_layers))
    root.norm = _mod(weight=_p(d))
    root.head = _mod(weight=_p(cfg.vocab_size, d))
    root.hc_head_fn, root.hc_head_base, root.hc_head_scale = _p(hc, hc * d), _p(hc), _p(1)
    mtps = []
    for j in range(cfg.n_mtp_layers):
        m = _block(cfg, cfg.n_layers + j)
        m.e_proj = _mod(weight=_p(d, d))
        m.h_proj = _mod(weight=_p(d, d))
        m.enorm, m.hnorm, m.norm = _mod(weight=_p(d)), _mod(weight=_p(d)), _mod(weight=_p(d))
        m.hc_head_fn, m.hc_head_base, m.hc_head_scale = _p(hc, hc * d), _p(hc), _p(1)
        mtps.append(m)
    root.mtp = nn.ModuleList(mtps)
    root.cfg = cfg
    return root


def expected_adamw(cfg) -> set[str]:
    """The documented AdamW set for a V4 model built from `cfg`."""
    names = {"embed.weight", "head.weight", "norm.weight", "hc_head_base", "hc_head_scale"}
    prefixes = [f"layers.{i}." for i in range(cfg.n_layers)]
    prefixes += [f"mtp.{j}." for j in range(cfg.n_mtp_layers)]
    for n, pre in enumerate(prefixes):
        kind = cfg.layer_kind(n)
        names |= {pre + s for s in ("attn_norm.weight", "ffn_norm.weight", "attn.q_norm.weight",
                                    "attn.kv_norm.weight", "attn.attn_sink", "hc_attn_base",
                                    "hc_attn_scale", "hc_ffn_base", "hc_ffn_scale")}
        if kind != "swa":
            names |= {pre + "attn.compressor.ape", pre + "attn.compressor.norm.weight"}
        if kind == "csa":
            names |= {pre + "attn.indexer.compressor.ape",
                      pre + "attn.indexer.compressor.norm.weight"}
        if pre.startswith("mtp."):
            names |= {pre + s for s in ("enorm.weight", "hnorm.weight", "norm.weight",
                                        "hc_head_base", "hc_head_scale")}
    return names


# 2-D (or more) tensors that are allowed in AdamW: embedding, head, compressor positional bias
ADAMW_MATRIX_SUFFIXES = ("embed.weight", "head.weight", "compressor.ape")


class ToyNet(nn.Module):
    """A small differentiable net with every kind of tensor the optimizer treats differently:
    embedding/head/norm (AdamW), plain matrices, a row-blocked matrix (`attn.wo_a`, 2 blocks),
    stacked experts [E, n, m] (Muon)."""

    def __init__(self, vocab: int = 32, dim: int = 16, hidden: int = 24, experts: int = 3,
                 seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)

        def init(*shape: int, std: float = 0.3) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=gen) * std)

        self.embed = _mod(weight=init(vocab, dim))
        self.attn_norm = _mod(weight=nn.Parameter(1 + 0.1 * torch.randn(dim, generator=gen)))
        attn = nn.Module()
        attn.wq_a = _mod(weight=init(hidden, dim))
        attn.wo_a = _mod(weight=init(2 * 8, hidden // 2))   # 2 row blocks of 8 × 12
        attn.wo_b = _mod(weight=init(dim, 16))
        attn.attn_sink = init(4)
        self.attn = attn
        ffn = nn.Module()
        ffn.experts = _mod(w1=init(experts, hidden, dim), w2=init(experts, dim, hidden))
        self.ffn = ffn
        self.head = _mod(weight=init(vocab, dim))
        self.n_experts = experts
        self.cfg = SimpleNamespace(o_groups=2)  # read by optim.param_groups for wo_a's blocks

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed.weight[tokens]                                    # [b, s, d]
        x = F.rms_norm(x, (x.shape[-1],)) * self.attn_norm.weight
        h = torch.tanh(x @ self.attn.wq_a.weight.T)                      # [b, s, hidden]
        hb = h.unflatten(-1, (2, -1))                                    # [b, s, 2, hidden/2]
        wo_a = self.attn.wo_a.weight.view(2, 8, -1)                      # [2, 8, hidden/2]
        o = torch.einsum("bsgd,grd->bsgr", hb, wo_a).flatten(-2)         # [b, s, 16]
        x = x + o @ self.attn.wo_b.weight.T + self.attn.attn_sink.sum()
        w = torch.softmax(x[..., : self.n_experts], dim=-1)             # [b, s, E]
        ex = torch.einsum("bsd,ehd->bseh", x, self.ffn.experts.w1)      # [b, s, E, hidden]
        ex = torch.einsum("bseh,edh->bsed", F.silu(ex), self.ffn.experts.w2)
        x = x + (w.unsqueeze(-1) * ex).sum(-2)
        return x @ self.head.weight.T                                    # [b, s, vocab]

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def toy_batch(n: int, seq: int = 9, vocab: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))
