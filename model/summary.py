"""Model summary: parameter table, total/activated counts, KV-cache bytes per token.

Builds the model on the meta device, so the 1.6T-parameter Pro preset costs no memory.

Counting conventions (spec §1.3): "total" is the main model without the MTP block (the MTP block
is reported on its own line); "activated per token" excludes the embedding (a lookup, not a
matmul) and the MTP block, and counts routed experts at top-k / n_routed_experts.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .config import CSA_RATIO, ModelConfig
from .transformer import Transformer


def build_meta(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def _category(name: str, kinds: dict[int, str]) -> str:
    m = re.match(r"(layers|mtp)\.(\d+)\.(.*)", name)
    if not m:
        return {"embed": "embedding", "head": "output head"}.get(name.split(".")[0],
                                                                "final norm + head collapse")
    where, idx, rest = m.groups()
    kind = "mtp" if where == "mtp" else kinds[int(idx)]
    if rest.startswith("attn.indexer."):
        part = "indexer"
    elif rest.startswith("attn.compressor."):
        part = "compressor"
    elif rest.startswith("attn."):
        part = "attention"
    elif rest.startswith("ffn.experts."):
        part = "routed experts"
    elif rest.startswith("ffn.shared_experts."):
        part = "shared expert"
    elif rest.startswith("ffn.gate."):
        part = "router"
    elif rest.startswith("hc_"):
        part = "mHC"
    elif rest.startswith(("e_proj", "h_proj", "enorm", "hnorm", "norm", "hc_head")):
        part = "MTP projections"
    else:
        part = "norms"
    return f"{kind.upper():4s} {part}"


@dataclass
class ParamCounts:
    total: int            # main model, MTP excluded
    mtp: int
    activated: int        # per token, embedding and MTP excluded
    table: "OrderedDict[str, int]"


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    model = build_meta(cfg)
    kinds = {i: cfg.layer_kind(i) for i in range(cfg.n_layers)}
    table: OrderedDict[str, int] = OrderedDict()
    total = mtp = activated = 0
    expert_fraction = cfg.n_activated_experts / cfg.n_routed_experts
    for name, p in model.named_parameters():
        n = p.numel()
        cat = _category(name, kinds)
        table[cat] = table.get(cat, 0) + n
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        if name.startswith("embed."):
            continue
        activated += n * expert_fraction if ".ffn.experts." in name else n
    return ParamCounts(total, mtp, int(activated), OrderedDict(sorted(table.items())))


@dataclass
class KVCacheBytes:
    per_token: float          # bytes per token of context, all layers
    per_sequence: float       # bytes for one sequence of `context` tokens
    dense_per_token: float    # a plain bf16 MQA cache of the same head_dim, every token, every layer


def kv_cache_bytes(cfg: ModelConfig, context: int = 1 << 20, layout: str = "bf16") -> KVCacheBytes:
    """Main-model KV cache (spec §4.7): a 128-slot window ring per layer, one entry per `ratio`
    tokens for CSA/HCA, and the indexer's keys for CSA. `layout='fp8'` is the released one:
    nope channels FP8 (1 byte) + RoPE channels BF16 per entry, indexer keys FP4 with 1×32 e8m0
    scales; `bf16` stores everything in 2 bytes."""
    c, rd, di = cfg.head_dim, cfg.rope_head_dim, cfg.index_head_dim
    if layout == "bf16":
        entry, index_key = 2 * c, 2 * di
    elif layout == "fp8":
        entry, index_key = (c - rd) + 2 * rd, di // 2 + di // 32
    else:
        raise ValueError(f"layout={layout!r}: choose 'bf16' or 'fp8'")
    total = 0.0
    for i in range(cfg.n_layers):
        ratio = cfg.compress_ratios[i]
        total += min(cfg.window_size, context) * entry  # window ring
        if ratio:
            total += (context // ratio) * entry
        if ratio == CSA_RATIO:
            total += (context // ratio) * index_key
    return KVCacheBytes(total / context, total, 2 * c * cfg.n_layers)


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_summary(cfg: ModelConfig, name: str = "") -> str:
    counts = count_parameters(cfg)
    lines = [f"DeepSeek-V4 model summary {name}".rstrip(),
             f"layers: {cfg.n_layers} (+{cfg.n_mtp_layers} MTP)  pattern: "
             + "".join({"swa": "S", "csa": "C", "hca": "H"}[cfg.layer_kind(i)]
                       for i in range(cfg.n_layers + cfg.n_mtp_layers)),
             "", f"{'module':32s} {'parameters':>18s}"]
    for cat, n in counts.table.items():
        lines.append(f"{cat:32s} {n:>18,d}")
    lines += ["",
              f"{'total (main model, no MTP)':32s} {counts.total:>18,d}  ({_human(counts.total)})",
              f"{'MTP block':32s} {counts.mtp:>18,d}  ({_human(counts.mtp)})",
              f"{'activated per token':32s} {counts.activated:>18,d}  "
              f"({_human(counts.activated)}; no embedding, no MTP)", ""]
    context = 1 << 20
    for layout in ("bf16", "fp8"):
        kv = kv_cache_bytes(cfg, context, layout)
        lines.append(f"KV cache at 1M context ({layout}): {kv.per_token:,.0f} B/token, "
                     f"{kv.per_sequence / 1e9:.2f} GB/sequence "
                     f"(dense bf16 MQA: {kv.dense_per_token:,.0f} B/token, "
                     f"{kv.dense_per_token / kv.per_token:.0f}x more)")
    return "\n".join(lines)
