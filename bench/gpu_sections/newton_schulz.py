"""Section 6, Newton-Schulz: V4's hybrid schedule (10 steps, `optim.newton_schulz`) in bf16 on a
4096² matrix and on the batched expert shapes of flash (each expert's [2048, 4096] matrices,
32 at a time), with its FLOP rate and how orthogonal the result is (the largest and smallest
singular values of the output, which the hybrid schedule pins near 1)."""

from __future__ import annotations

import torch

from optim.newton_schulz import newton_schulz

from .common import Ctx, Result, guarded

STEPS = 10


def flops(batch: int, n: int, m: int) -> float:
    s, l_ = min(n, m), max(n, m)
    per_step = 2 * s * s * l_ + 2 * s * s * s + 2 * s * s * l_   # X·Xᵀ, A·A, B·X
    return batch * STEPS * per_step


def measure(ctx: Ctx, r: Result, label: str, shape: tuple[int, int, int]) -> None:
    g = torch.randn(*shape, device=ctx.device)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    ms = ctx.time_ms(lambda: newton_schulz(g, "hybrid10", dtype=dtype), reps=2 if ctx.tiny else 10)
    out = newton_schulz(g[:1], "hybrid10", dtype=dtype).float()[0]
    sv = torch.linalg.svdvals(out)
    r.add(label, "×".join(map(str, shape)), str(dtype)[6:], ms,
          flops(*shape) / (ms * 1e-3) / 1e12, f"{sv.min().item():.2f}–{sv.max().item():.2f}")


def run(ctx: Ctx) -> Result:
    r = Result("Newton-Schulz (hybrid, 10 steps)",
               ["matrix", "shape", "dtype", "ms", "TFLOP/s", "singular values"])
    shapes = ([("square", (1, 64, 64)), ("experts", (4, 32, 64))] if ctx.tiny else
              [("square 4096²", (1, 4096, 4096)), ("flash experts w1/w3", (32, 2048, 4096)),
               ("flash experts w2", (32, 4096, 2048))])
    for label, shape in shapes:
        guarded(r, label, lambda: measure(ctx, r, label, shape))
    if ctx.peak_tflops:
        r.notes.append(f"dense bf16 peak {ctx.peak_tflops:.0f} TFLOP/s")
    return r
