"""Section 3, kernel speed: `bench/triton_kernels.py`'s measurements (sparse attention against dense
SDPA at 8K-64K, mHC, RMSNorm, SwiGLU, grouped GEMM, MoE permute, Gram, FP8 quantisation, each
against its eager reference) run in this process, its tables and goals kept as this section's.

The full shapes when more than `FULL_S` seconds of the budget are left, `--quick` shapes
otherwise; `--tiny` uses its `--smoke` shapes through the Triton interpreter.
"""

from __future__ import annotations

import os

import torch

from .common import Ctx, Result, bench_module, guarded

kb = bench_module("triton_kernels")  # bench/triton_kernels.py

FULL_S = 240.0
OPS = ("norm", "swiglu", "mhc", "attn", "moe", "gram", "fp8")


def run(ctx: Ctx) -> Result:
    r = Result("Kernel speed: Triton kernel vs eager reference",
               ["op", "shape", "kernel ms", "ref ms", "speedup", "kernel throughput", "note"])
    mode = ["--smoke"] if ctx.tiny else ([] if ctx.left() > FULL_S else ["--quick"])
    kb.ARGS = kb.parse(mode)
    kb.DEV = str(ctx.device)
    kb.SPEED.clear(), kb.CORRECT.clear(), kb.GOALS.clear()
    if ctx.tiny:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["V4_KERNELS"] = "triton"
    import v4kernels as K

    sections = dict(norm=kb.bench_rms_norm, swiglu=kb.bench_swiglu, mhc=kb.bench_mhc,
                    attn=kb.bench_sparse_attention, moe=kb.bench_grouped, gram=kb.bench_gram,
                    fp8=kb.bench_fp8)
    torch.manual_seed(0)
    for key in OPS:
        if ctx.left() < 30 and not ctx.tiny:
            r.failed.append(f"{key}: skipped, the time budget ran out")
            continue
        guarded(r, key, lambda: sections[key](K))
    for row in kb.SPEED:
        r.add(*row)
    r.notes += [f"shapes: {'smoke (interpreter: timings are meaningless)' if ctx.tiny else ('quick' if mode else 'full')}",
                *kb.GOALS]
    r.notes += [f"bf16 spot check {op}: worst err/tol {worst}, rel. Frobenius {frob}: {res}"
                for op, worst, frob, res in kb.CORRECT]
    r.failed += [f"bf16 spot check {op} failed" for op, _, _, res in kb.CORRECT if res != "PASS"]
    return r
