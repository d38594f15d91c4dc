"""Benchmark: optimizer-step time of v4lab's Muon vs torch.optim.Muon vs torch.optim.AdamW on the
same matrices, and Newton-Schulz time on a 4096×4096 matrix (goal G-M7: hybrid10 ≤ 7 ms in bf16
on an H100/H200).

The matrices are the Muon-routed parameters of a model preset (built on the meta device, so only
shapes are used): by default the `small` preset, with fewer layers and experts on CPU. Stacked
experts [E, n, m] are one tensor for v4lab's Muon (one batched Newton-Schulz) and AdamW, but E
separate 2-D parameters for torch.optim.Muon, which only accepts matrices. torch.optim.Muon
always iterates in bf16 and runs kj5 (5 steps); ours runs hybrid10 (10 steps) by default.

    python bench/muon.py                       # CPU: 2 layers (CSA + HCA) + MTP, 8 experts
    python bench/muon.py --device cuda --layers 12 --experts 64
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.config import get_config  # noqa: E402
from optim import MuonAdamW, newton_schulz, param_groups  # noqa: E402


def muon_shapes(preset: str, layers: int, experts: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, row_blocks) of the Muon-routed parameters of `preset`, scaled down."""
    from model.transformer import Transformer
    cfg = get_config(preset)
    experts = min(experts, cfg.n_routed_experts)
    # the last `layers` main layers (CSA/HCA alternating in every preset), plus the MTP block
    kinds = cfg.compress_ratios[cfg.n_layers - layers:cfg.n_layers] + \
        cfg.compress_ratios[cfg.n_layers:]
    cfg = cfg.replace(n_layers=layers, compress_ratios=kinds,
                      n_hash_layers=min(cfg.n_hash_layers, layers), n_routed_experts=experts,
                      n_activated_experts=min(cfg.n_activated_experts, experts))
    with torch.device("meta"):
        model = Transformer(cfg)
    muon = next(g for g in param_groups(model) if g["use_muon"])
    return [(n, tuple(p.shape), k) for n, p, k in
            zip(muon["param_names"], muon["params"], muon["row_blocks"])]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(make_opt, params: list[torch.Tensor], device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` optimizer steps in ms, after one warm-up step (the minimum is the
    least sensitive to other load on a shared machine)."""
    opt = make_opt(params)
    gen = torch.Generator(device=device).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype)
    opt.step()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def bench_steps(args, device: torch.device) -> None:
    shapes = muon_shapes(args.preset, args.layers, args.experts)
    n_params = sum(torch.Size(s).numel() for _, s, _ in shapes)
    print(f"matrices: {len(shapes)} tensors, {n_params / 1e6:.1f}M parameters "
          f"({args.preset}, {args.layers} layer(s), {args.experts} experts), device {device}")

    def fresh(split_experts: bool) -> list[torch.Tensor]:
        out = []
        for _, s, _ in shapes:
            w = torch.randn(s, device=device) * 0.02
            if split_experts and len(s) == 3:
                out += [torch.nn.Parameter(w[e].clone()) for e in range(s[0])]
            else:
                out.append(torch.nn.Parameter(w))
        return out

    blocks = [k for _, _, k in shapes]
    results = {}
    for label, dtype in (("v4lab Muon hybrid10", None), ("v4lab Muon hybrid10 bf16", torch.bfloat16),
                         ("v4lab Muon kj5 bf16", torch.bfloat16)):
        if device.type != "cpu" and dtype is None:
            continue   # the default is already bf16 off-CPU
        coeffs = "kj5" if "kj5" in label else "hybrid10"
        results[label] = time_steps(
            lambda ps: MuonAdamW([{"params": ps, "use_muon": True, "row_blocks": blocks}],
                                 lr=1e-3, ns_coefficients=coeffs, ns_dtype=dtype),
            fresh(False), device, args.repeats)
    results["torch.optim.Muon (kj5, bf16)"] = time_steps(
        lambda ps: torch.optim.Muon(ps, lr=1e-3, adjust_lr_fn="match_rms_adamw"), fresh(True),
        device, args.repeats)
    results["torch.optim.AdamW"] = time_steps(
        lambda ps: torch.optim.AdamW(ps, lr=1e-3), fresh(False), device, args.repeats)
    ref_muon, ref_adamw = results["torch.optim.Muon (kj5, bf16)"], results["torch.optim.AdamW"]
    print(f"{'optimizer step':34s} {'ms':>10s} {'/ torch Muon':>13s} {'/ AdamW':>9s}")
    for label, ms in results.items():
        print(f"{label:34s} {ms:10.1f} {ms / ref_muon:13.2f} {ms / ref_adamw:9.1f}")


def bench_ns(args, device: torch.device) -> None:
    n = args.ns_size
    G = torch.randn(n, n, device=device)
    flops_per_iter = 6 * n ** 3   # 4·n²·m + 2·n³ with m = n
    print(f"Newton-Schulz on {n}x{n}, device {device}")
    for sched, steps in (("hybrid10", 10), ("kj5", 5)):
        for dtype in (torch.bfloat16, torch.float32):
            newton_schulz(G, sched, dtype=dtype)   # warm-up
            times = []
            for _ in range(args.ns_repeats):
                sync(device)
                t = time.perf_counter()
                newton_schulz(G, sched, dtype=dtype)
                sync(device)
                times.append(time.perf_counter() - t)
            ms = min(times) * 1e3
            tflops = flops_per_iter * steps / (ms / 1e3) / 1e12
            goal = ""
            if device.type == "cuda" and dtype == torch.bfloat16:
                limit = 7.0 if sched == "hybrid10" else 3.5
                goal = f"  (G-M7 goal <= {limit} ms: {'met' if ms <= limit else 'NOT met'})"
            print(f"  {sched:9s} {str(dtype).replace('torch.', ''):9s} {ms:10.1f} ms "
                  f"{tflops:8.2f} TFLOP/s{goal}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=None, help="default: 2 on CPU, all on GPU")
    ap.add_argument("--experts", type=int, default=None, help="default: 8 on CPU, all on GPU")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--ns-size", type=int, default=4096)
    ap.add_argument("--ns-repeats", type=int, default=None)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-ns", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    cfg = get_config(args.preset)
    args.layers = args.layers or (2 if cpu else cfg.n_layers)
    args.experts = args.experts or (8 if cpu else cfg.n_routed_experts)
    args.repeats = args.repeats or (3 if cpu else 20)
    args.ns_repeats = args.ns_repeats or (1 if cpu else 20)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if not args.skip_steps:
        bench_steps(args, device)
    if not args.skip_ns:
        bench_ns(args, device)


if __name__ == "__main__":
    main()
