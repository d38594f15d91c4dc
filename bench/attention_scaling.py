"""Attention cost vs sequence length: one SWA, CSA and HCA layer against dense causal attention
of the same dims (the tiny preset's), forward + backward, time and peak memory.

    python bench/attention_scaling.py [--seqs 1024 4096 16384] [--device cpu]

Two dense baselines share our layer's projections: `dense-eager` materialises the [seq, seq]
scores (what a plain PyTorch implementation does), `dense-sdpa` is PyTorch's fused
`scaled_dot_product_attention` (flash-style, O(seq) memory). Each measurement runs in a fresh
subprocess so peak RSS (CPU) or peak allocated memory (GPU) belongs to that case alone.
Prints `name: ours …, baseline …, ratio …` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS = {"swa": 0, "csa": 1, "hca": 2}  # tiny preset layer ids of each kind


def _measure(kind: str, seq: int, device: str, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from model.attention import Attention, AttentionContext
    from model.config import get_config
    from model.rope import rope_frequencies

    torch.manual_seed(0)
    cfg = get_config("tiny")
    layer = Attention(cfg, LAYERS.get(kind, 0)).to(device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)

    def run(n: int) -> None:
        x = torch.randn(batch, n, cfg.dim, device=device, requires_grad=True)
        doc = torch.zeros(batch, n, dtype=torch.long, device=device)
        pos = torch.arange(n, device=device).expand(batch, n)
        freqs = {c: rope_frequencies(cfg, c).to(device) for c in (False, True)}
        if kind.startswith("dense"):
            _, q, kv = layer.project_qkv(x, pos, freqs[False])
            q = q.transpose(1, 2)  # [batch, heads, seq, c]
            k = kv[:, None].expand(-1, cfg.n_heads, -1, -1)
            if kind == "dense-sdpa":
                o = F.scaled_dot_product_attention(q, k, k, is_causal=True)
            else:
                s = (q @ k.transpose(-1, -2)) * cfg.head_dim ** -0.5
                causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
                o = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1) @ k
            out = layer.project_out(o.transpose(1, 2))
        else:
            ctx = AttentionContext(doc, pos, freqs, "sparse", kind == "csa")
            out, idx_loss = layer(x, ctx)
            out = out.float().sum() + idx_loss
        out.float().sum().backward()

    run(64)  # warm-up: allocator and kernels
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    run(seq)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"seconds": time.perf_counter() - start, "peak_bytes": max(peak, 0)}


def measure(kind: str, seq: int, device: str, batch: int, timeout: float) -> dict | None:
    """One case in a fresh interpreter (clean peak-memory counter)."""
    cmd = [sys.executable, __file__, "--one", kind, str(seq), device, str(batch)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        print(f"  {kind} @ {seq}: failed ({out.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, seq, device, batch = args.one
        print(json.dumps(_measure(kind, int(seq), device, int(batch))))
        return
    print(f"tiny-preset attention layer, batch {args.batch}, forward+backward on {args.device}")
    for seq in args.seqs:
        res = {k: measure(k, seq, args.device, args.batch, args.timeout)
               for k in ("dense-eager", "dense-sdpa", "swa", "csa", "hca")}
        for kind in ("swa", "csa", "hca"):
            ours = res[kind]
            if ours is None:
                continue
            for base_name in ("dense-eager", "dense-sdpa"):
                base = res[base_name]
                if base is None:
                    print(f"{kind}@{seq} vs {base_name}: ours {ours['seconds']:.3f}s, "
                          f"baseline did not finish")
                    continue
                print(f"{kind}@{seq} vs {base_name} time: ours {ours['seconds']:.3f}s, baseline "
                      f"{base['seconds']:.3f}s, ratio {ours['seconds'] / base['seconds']:.3f}")
                print(f"{kind}@{seq} vs {base_name} memory: ours {ours['peak_bytes'] / 2**20:.0f}"
                      f" MiB, baseline {base['peak_bytes'] / 2**20:.0f} MiB, ratio "
                      f"{ours['peak_bytes'] / max(base['peak_bytes'], 1):.3f}")


if __name__ == "__main__":
    main()
