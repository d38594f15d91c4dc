"""Training-step throughput: tokens/s (and MFU on a GPU) of one optimizer step.

    python bench/train_step.py [--presets tiny small] [--device cpu|cuda] [--steps 3]

For each preset: forward+backward alone (the baseline: what any optimizer must pay), then a full
step with our Muon+AdamW, then a full step with torch.optim.AdamW, all on the same batch shape in
the same process. Prints `name: ours …, baseline …, ratio …` lines. On CPU the `small` preset
(1.5B parameters) is skipped unless asked for explicitly with --presets small.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.config import get_config  # noqa: E402
from model.loss import compute_loss  # noqa: E402
from model.summary import count_parameters  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from optim import build_optimizer  # noqa: E402
from train.metrics import detect_peak_tflops, flops_per_token  # noqa: E402

SHAPES = {"tiny": (4, 256), "small": (1, 4096)}  # (micro-batch, seq_len)


def timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bench(preset: str, device: torch.device, steps: int) -> None:
    cfg = get_config(preset)
    batch, seq = SHAPES[preset]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        model = Transformer(cfg).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    tokens = batch * seq

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        compute_loss(model(ids), ids).total.backward()

    def step_with(opt):
        def run():
            fwd_bwd()
            opt.step()
        return run

    base = timed(fwd_bwd, steps, device)
    muon = timed(step_with(build_optimizer(model, lr=1e-4, model_config=cfg)), steps, device)
    adamw = timed(step_with(torch.optim.AdamW(model.parameters(), lr=1e-4)), steps, device)
    print(f"{preset} step ({batch}x{seq} tokens, {device.type}, {dtype}):")
    print(f"{preset} muon step: ours {tokens / muon:,.0f} tok/s, baseline fwd+bwd "
          f"{tokens / base:,.0f} tok/s, ratio {base / muon:.3f}")
    print(f"{preset} muon vs adamw step: ours {tokens / muon:,.0f} tok/s, baseline adamw "
          f"{tokens / adamw:,.0f} tok/s, ratio {adamw / muon:.3f}")
    peak = detect_peak_tflops(device)
    if peak:
        fpt = flops_per_token(cfg, count_parameters(cfg).activated, seq)
        print(f"{preset} MFU: {tokens / muon * fpt / (peak * 1e12):.3f} of {peak:.0f} TFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    presets = args.presets or (["tiny", "small"] if device.type == "cuda" else ["tiny"])
    for p in presets:
        bench(p, device, args.steps)


if __name__ == "__main__":
    main()
