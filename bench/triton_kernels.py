"""GPU benchmark of `v4kernels/`: every kernel against its reference, sparse attention against
dense SDPA, and a bf16 correctness pass against the fp32 references.

    python bench/triton_kernels.py            # full: V4-Flash shapes, attention at 8K/32K/64K tokens
    python bench/triton_kernels.py --quick    # smaller shapes, attention at 8K/16K
    python bench/triton_kernels.py --smoke    # toy shapes on the CPU through the Triton interpreter:
                                       # checks that every code path runs; timings meaningless

Without a CUDA GPU (and without --smoke) it exits with a message and status 2.

Output: two markdown tables. Speed: op, shape, kernel ms, reference ms, speedup, and throughput
(TFLOP/s for GEMM-like ops, GB/s for memory-bound ones). Correctness: the bf16 kernel against the
fp32 reference run on the same bf16-rounded inputs, with torch.testing's bf16 tolerance (atol
1e-5, rtol 1.6e-2) as "worst err/tol" (≤ 1 passes) and the relative Frobenius error.

Goals checked (doc muon_and_kernels.md §2.3): sparse attention forward ≥ 10× dense SDPA at 64K
(G-K3); RMSNorm forward+backward ≥ 2× eager (G-K7); mHC one launch per site (G-K8); grouped GEMM
≥ 0.7× dense matmul TFLOP/s (G-K5).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ARGS = None
DEV = "cuda"
SPEED: list[tuple] = []
CORRECT: list[tuple] = []
GOALS: list[str] = []


# ------------------------------------------------------------------------------- harness
def bench_ms(fn) -> float:
    """Median milliseconds of fn() (triton's do_bench on a GPU; in --smoke, the CPU
    self-test through the interpreter, one call, timed with its warm-up: a number that only
    shows the path ran)."""
    if ARGS.smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def try_ms(fn):
    try:
        return bench_ms(fn)
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # e.g. no SDPA backend for the dims
        print(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def record(op, shape, k_ms, r_ms, work=None, unit="TFLOP/s", note=""):
    """work: FLOPs (unit TFLOP/s) or bytes (unit GB/s) of one kernel call."""
    speed = f"{r_ms / k_ms:.2f}×" if (k_ms and r_ms) else "n/a"
    thr = "n/a"
    if work and k_ms:
        scale = 1e12 if unit == "TFLOP/s" else 1e9
        thr = f"{work / (k_ms * 1e-3) / scale:.1f} {unit}"
    fmt = (lambda v: f"{v:.3f}" if v is not None else "n/a")
    SPEED.append((op, shape, fmt(k_ms), fmt(r_ms), speed, thr, note))
    print(f"  {op:<28} {shape:<34} kernel {fmt(k_ms):>9} ms  ref {fmt(r_ms):>9} ms  {speed}")


def check(op, got, want, atol=1e-5, rtol=1.6e-2):
    """Record got (kernel, any dtype) against want (fp32 reference)."""
    got, want = got.float(), want.float()
    worst = ((got - want).abs() / (atol + rtol * want.abs())).max().item() if want.numel() else 0
    frob = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
    CORRECT.append((op, f"{worst:.3g}", f"{frob:.2e}", "PASS" if worst <= 1 else "FAIL"))


def grads_of(fn, inputs, seed):
    out = fn()
    return [out] + list(torch.autograd.grad(out, inputs, seed, allow_unused=True))


def randn(*shape, dtype=torch.float32, scale=1.0, grad=False):
    t = (torch.randn(*shape, device=DEV) * scale).to(dtype)
    return t.requires_grad_() if grad else t


def cuda_launches(fn) -> str:
    """Number of GPU kernels one call of fn launches (torch profiler)."""
    if ARGS.smoke:
        return "n/a (CPU)"
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return str(len(names))


# ------------------------------------------------------------------------------- ops
def bench_rms_norm(K):
    print("RMSNorm")
    for dim in ARGS.norm_dims:
        n = ARGS.tokens
        x, w = randn(n, dim, dtype=torch.bfloat16, grad=True), randn(dim, grad=True)
        g = randn(n, dim, dtype=torch.bfloat16)
        fwd = lambda f: (lambda: f(x, w, 1e-6))  # noqa: E731
        both = lambda f: (lambda: torch.autograd.grad(f(x, w, 1e-6), (x, w), g))  # noqa: E731
        record("rms_norm fwd", f"[{n}, {dim}] bf16", bench_ms(fwd(K.rms_norm)),
               bench_ms(fwd(K.rms_norm_ref)), 2 * n * dim * 2, "GB/s")
        k_ms, r_ms = bench_ms(both(K.rms_norm)), bench_ms(both(K.rms_norm_ref))
        record("rms_norm fwd+bwd", f"[{n}, {dim}] bf16", k_ms, r_ms, 5 * n * dim * 2, "GB/s")
        GOALS.append(f"G-K7 RMSNorm fwd+bwd ≥ 2× eager at dim {dim}: {r_ms / k_ms:.2f}× "
                     f"({'met' if r_ms / k_ms >= 2 else 'NOT met'})")
    x, w = randn(512, 1024, dtype=torch.bfloat16, grad=True), randn(1024, grad=True)
    g = randn(512, 1024, dtype=torch.bfloat16)
    got = grads_of(lambda: K.rms_norm(x, w, 1e-6), (x, w), g)
    xf = x.detach().float().requires_grad_()
    want = grads_of(lambda: K.rms_norm_ref(xf, w, 1e-6), (xf, w), g.float())
    for name, a, b in zip(("rms_norm y", "rms_norm dx", "rms_norm dw"), got, want):
        check(name, a, b)


def bench_swiglu(K):
    print("SwiGLU")
    n, inter = ARGS.tokens, ARGS.inter
    gate = randn(n, inter, dtype=torch.bfloat16, scale=4, grad=True)
    up = randn(n, inter, dtype=torch.bfloat16, scale=4, grad=True)
    g = randn(n, inter)
    for name, fn in (("fwd", lambda f: lambda: f(gate, up, 10.0)),
                     ("fwd+bwd", lambda f: lambda: torch.autograd.grad(f(gate, up, 10.0),
                                                                        (gate, up), g))):
        nbytes = n * inter * (2 + 2 + 4) * (1 if name == "fwd" else 2.5)
        record(f"swiglu {name}", f"[{n}, {inter}] bf16→fp32", bench_ms(fn(K.swiglu)),
               bench_ms(fn(K.swiglu_ref)), nbytes, "GB/s")
    gate_s, up_s = gate[:512].detach().requires_grad_(), up[:512].detach().requires_grad_()
    got = grads_of(lambda: K.swiglu(gate_s, up_s, 10.0), (gate_s, up_s), g[:512])
    gf, uf = gate_s.detach().float().requires_grad_(), up_s.detach().float().requires_grad_()
    want = grads_of(lambda: K.swiglu_ref(gf, uf, 10.0), (gf, uf), g[:512])
    for name, a, b in zip(("swiglu h", "swiglu dgate", "swiglu dup"), got, want):
        check(name, a, b)


def bench_mhc(K):
    print("mHC (hc=4, 20 Sinkhorn rounds)")
    n, hc = ARGS.tokens, 4
    m = randn(n, (2 + hc) * hc, grad=True)
    sc, base = (torch.rand(3, device=DEV) + 0.5).requires_grad_(), randn(24, grad=True)
    seeds = [randn(n, hc), randn(n, hc), randn(n, hc, hc)]
    fwd = lambda f: (lambda: f(m, sc, base, hc, 20, 1e-6))  # noqa: E731
    both = lambda f: (lambda: torch.autograd.grad(f(m, sc, base, hc, 20, 1e-6),  # noqa: E731
                                                  (m, sc, base), seeds))
    launches = cuda_launches(fwd(K.hc_split_sinkhorn))
    ref_launches = cuda_launches(fwd(K.hc_split_sinkhorn_ref))
    record("mhc fwd", f"[{n}, 24] fp32", bench_ms(fwd(K.hc_split_sinkhorn)),
           bench_ms(fwd(K.hc_split_sinkhorn_ref)), note=f"launches {launches} vs {ref_launches}")
    record("mhc fwd+bwd", f"[{n}, 24] fp32", bench_ms(both(K.hc_split_sinkhorn)),
           bench_ms(both(K.hc_split_sinkhorn_ref)))
    GOALS.append(f"G-K8 mHC launches per site (forward): {launches} (reference {ref_launches})")
    got = grads_of(lambda: torch.cat([t.flatten(1) for t in fwd(K.hc_split_sinkhorn)()], 1),
                   (m, sc, base), torch.cat([s.flatten(1) for s in seeds], 1))
    want = grads_of(lambda: torch.cat([t.flatten(1) for t in fwd(K.hc_split_sinkhorn_ref)()], 1),
                    (m, sc, base), torch.cat([s.flatten(1) for s in seeds], 1))
    for name, a, b in zip(("mhc pre|post|comb (fp32)", "mhc dmixes", "mhc dscale", "mhc dbase"),
                          got, want):
        check(name, a, b, atol=1e-5, rtol=1e-5)


def _attn_inputs(s, h, c, k_sel, window, dtype, grad=False):
    n_comp = max(1, s // 4)
    q = randn(1, s, h, c, dtype=dtype, grad=grad)
    kv = randn(1, s + n_comp, c, dtype=dtype, grad=grad)
    sink = randn(h, grad=grad)
    t = torch.arange(s, device=DEV)[:, None]
    win = t - window + 1 + torch.arange(window, device=DEV)[None, :]
    win = torch.where(win >= 0, win, -1)
    sel = torch.randint(0, n_comp, (s, k_sel), device=DEV) + s
    idx = torch.cat((win, sel), 1)[None].to(torch.int32).contiguous()     # [1, s, window + k]
    return q, kv, idx, sink


def bench_sparse_attention(K):
    print("Sparse attention vs dense SDPA")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    h, c, k_sel, window = ARGS.heads, ARGS.head_dim, ARGS.topk, ARGS.window
    kk = k_sel + window
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.CUDNN_ATTENTION] + ([SDPBackend.MATH] if ARGS.smoke else [])
    for s in ARGS.seqs:
        q, kv, idx, sink = _attn_inputs(s, h, c, k_sel, window, torch.bfloat16, grad=True)
        scale = c ** -0.5
        g = randn(1, s, h, c, dtype=torch.bfloat16)
        fwd = lambda: K.sparse_attention(q, kv, idx, sink, scale,  # noqa: E731
                                         out_dtype=torch.bfloat16)
        both = lambda: torch.autograd.grad(fwd(), (q, kv, sink), g)  # noqa: E731
        k_ms, kb_ms = bench_ms(fwd), bench_ms(both)
        r_ms = None
        if s <= ARGS.ref_max_seq:
            r_ms = bench_ms(lambda: K.sparse_attention_ref(q, kv, idx, sink, scale))
        flops = 4 * s * h * c * kk
        record("sparse_attn fwd", f"s={s} h={h} c={c} k={kk}", k_ms, r_ms, flops)
        record("sparse_attn fwd+bwd", f"s={s} h={h} c={c} k={kk}", kb_ms, None, 3.5 * flops)
        del g
        qd = q.detach().transpose(1, 2).contiguous()                       # [1, h, s, c]
        kvd = kv.detach()[:, None, :s].expand(1, h, s, c).contiguous()    # MQA → h heads
        with sdpa_kernel(backends):
            d_ms = try_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                qd, kvd, kvd, is_causal=True))
        del qd, kvd
        record("dense SDPA causal fwd", f"s={s} h={h} c={c}", d_ms, None, 2 * s * s * h * c)
        if d_ms:
            ratio = d_ms / k_ms
            GOALS.append(f"G-K3 sparse fwd vs dense SDPA at s={s}: {ratio:.1f}×"
                         + (f" ({'met' if ratio >= 10 else 'NOT met'}, goal ≥ 10× at 64K)"
                            if s >= 65536 else ""))
        del q, kv, idx, sink
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    s = ARGS.check_seq
    q, kv, idx, sink = _attn_inputs(s, min(h, 16), c, k_sel, window, torch.bfloat16, grad=True)
    idx[0, :3] = -1                                                       # empty lists too
    g = randn(1, s, q.shape[2], c)
    got = grads_of(lambda: K.sparse_attention(q, kv, idx, sink, c ** -0.5), (q, kv, sink), g)
    qf, kvf = (t.detach().float().requires_grad_() for t in (q, kv))
    want = grads_of(lambda: K.sparse_attention_ref(qf, kvf, idx, sink, c ** -0.5),
                    (qf, kvf, sink), g)
    for name, a, b in zip(("sparse_attn out", "sparse_attn dq", "sparse_attn dkv",
                           "sparse_attn dsink"), got, want):
        check(name, a, b)


def _counts(n_exp, rows):
    counts = torch.distributions.Multinomial(n_exp * rows, torch.ones(n_exp)).sample().long()
    return counts.to(DEV)


def bench_grouped(K):
    print("MoE grouped GEMM / experts / permute")
    import v4kernels.grouped_gemm as gg
    n_exp, rows, dim, inter = ARGS.experts, ARGS.rows_per_expert, ARGS.dim, ARGS.inter
    counts = _counts(n_exp, rows)
    n = int(counts.sum())
    x = randn(n, dim, dtype=torch.bfloat16, grad=True)
    w = randn(n_exp, dim, inter, dtype=torch.bfloat16, scale=dim ** -0.5, grad=True)
    flops = 2 * n * dim * inter
    k_ms = bench_ms(lambda: K.grouped_mm(x, w, counts))
    record("grouped_mm fwd", f"E={n_exp} N={n} {dim}→{inter}", k_ms,
           bench_ms(lambda: K.grouped_mm_ref(x, w, counts)), flops)
    t_ms = None
    if hasattr(torch, "_grouped_mm") and not ARGS.smoke:
        t_ms = try_ms(lambda: gg.grouped_mm_torch(x, w, counts))
        record("torch._grouped_mm (padded)", f"E={n_exp} N={n} {dim}→{inter}", t_ms, None, flops)
    dense_w = w[0].detach()
    d_ms = bench_ms(lambda: x.detach() @ dense_w)
    record("dense matmul (same FLOPs)", f"[{n}, {dim}]·[{dim}, {inter}]", d_ms, None, flops)
    GOALS.append(f"G-K5 grouped GEMM vs dense matmul TFLOP/s: {d_ms / k_ms:.2f}× (goal ≥ 0.7)"
                 + (f"; torch._grouped_mm {d_ms / t_ms:.2f}×" if t_ms else ""))
    gy = randn(n, inter, dtype=torch.bfloat16)
    record("grouped_mm fwd+bwd", f"E={n_exp} N={n} {dim}→{inter}",
           bench_ms(lambda: torch.autograd.grad(K.grouped_mm(x, w, counts), (x, w), gy)),
           bench_ms(lambda: torch.autograd.grad(K.grouped_mm_ref(x, w, counts), (x, w), gy)),
           3 * flops)
    w1 = randn(n_exp, inter, dim, dtype=torch.bfloat16, scale=dim ** -0.5, grad=True)
    w3 = randn(n_exp, inter, dim, dtype=torch.bfloat16, scale=dim ** -0.5, grad=True)
    w2 = randn(n_exp, dim, inter, dtype=torch.bfloat16, scale=inter ** -0.5, grad=True)
    rw = torch.rand(n, device=DEV)
    gx = randn(n, dim, dtype=torch.bfloat16)
    exp = lambda f: (lambda: torch.autograd.grad(  # noqa: E731
        f(x, counts, rw, w1, w3, w2, 10.0), (x, w1, w3, w2), gx))
    record("experts swiglu fwd+bwd", f"E={n_exp} N={n} d={dim} I={inter}",
           bench_ms(exp(K.grouped_swiglu_experts)), bench_ms(exp(K.grouped_swiglu_experts_ref)),
           3 * 3 * flops)
    # permute / unpermute
    k = min(6, n_exp)
    t = max(1, n // k)
    xt = randn(t, dim, dtype=torch.bfloat16, grad=True)
    ids = torch.rand(t, n_exp, device=DEV).topk(k, -1).indices
    wts = torch.rand(t, k, device=DEV)
    gt = randn(t, dim)

    def roundtrip(ref):
        if ref:
            from v4kernels.moe_permute import (moe_permute_ref, moe_unpermute_ref,
                                             sort_by_expert)
            order, inverse, _ = sort_by_expert(ids, n_exp)
            y = moe_permute_ref(xt, order, k)
            return moe_unpermute_ref(y, inverse, k, wts)
        y, _, order, inverse = K.moe_permute(xt, ids, n_exp)
        return K.moe_unpermute(y, inverse, order, k, wts)
    record("permute+unpermute fwd+bwd", f"T={t} k={k} d={dim} bf16",
           bench_ms(lambda: torch.autograd.grad(roundtrip(False), xt, gt)),
           bench_ms(lambda: torch.autograd.grad(roundtrip(True), xt, gt)),
           t * k * dim * 2 * 4, "GB/s")
    # bf16 correctness at a small shape, with an empty expert
    cs = torch.tensor([300, 0, 17, 129], device=DEV)
    xs = randn(int(cs.sum()), 256, dtype=torch.bfloat16, grad=True)
    ws = randn(4, 256, 192, dtype=torch.bfloat16, scale=256 ** -0.5, grad=True)
    gs = randn(int(cs.sum()), 192)
    got = grads_of(lambda: K.grouped_mm(xs, ws, cs), (xs, ws), gs.bfloat16())
    xf, wf = (t_.detach().float().requires_grad_() for t_ in (xs, ws))
    want = grads_of(lambda: K.grouped_mm_ref(xf, wf, cs), (xf, wf), gs.bfloat16().float())
    for name, a, b in zip(("grouped_mm y", "grouped_mm dx", "grouped_mm dw"), got, want):
        check(name, a, b)


def bench_gram(K):
    print("Gram X·Xᵀ (Newton-Schulz)")
    b, m, n = ARGS.gram_shape
    x = randn(b, m, n, dtype=torch.bfloat16, scale=0.02)
    record("gram", f"[{b}, {m}, {n}] bf16", bench_ms(lambda: K.gram(x)),
           bench_ms(lambda: K.gram_ref(x)), 2 * b * m * m * n, note="FLOPs counted as full")
    xs = x[:2, :256, :512]
    check("gram (bf16 vs fp32)", K.gram(xs), K.gram_ref(xs.float()))


def bench_fp8(K):
    print("FP8 block quant")
    x = randn(ARGS.tokens, ARGS.dim, dtype=torch.bfloat16, scale=3)
    record("fp8_block_quant", f"[{ARGS.tokens}, {ARGS.dim}] bf16", bench_ms(
        lambda: K.fp8_block_quant(x)), bench_ms(lambda: K.fp8_block_quant_ref(x)),
        x.numel() * 3, "GB/s")
    q, s = K.fp8_block_quant(x[:256])
    q_r, s_r = K.fp8_block_quant_ref(x[:256])
    same = torch.equal(q.view(torch.uint8), q_r.view(torch.uint8)) and torch.equal(s, s_r)
    CORRECT.append(("fp8_block_quant (bit-exact vs ref)", "-", "-", "PASS" if same else "FAIL"))


# ------------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller shapes")
    p.add_argument("--smoke", action="store_true", help="toy shapes on CPU via the interpreter")
    p.add_argument("--only", nargs="*", default=None,
                   help="subset: norm swiglu mhc attn moe gram fp8")
    a = p.parse_args(argv)
    full = dict(tokens=16384, dim=4096, inter=2048, norm_dims=[4096, 7168], heads=64,
                head_dim=512, topk=512, window=128, seqs=[8192, 32768, 65536], ref_max_seq=8192,
                check_seq=1024, experts=16, rows_per_expert=2048, gram_shape=(8, 2048, 4096))
    if a.quick:
        full.update(tokens=4096, norm_dims=[4096], seqs=[8192, 16384], ref_max_seq=4096,
                    experts=8, rows_per_expert=1024, gram_shape=(2, 1024, 2048))
    if a.smoke:
        full.update(tokens=32, dim=64, inter=32, norm_dims=[48], heads=2, head_dim=16, topk=8,
                    window=4, seqs=[32], ref_max_seq=32, check_seq=16, experts=3,
                    rows_per_expert=20, gram_shape=(1, 40, 48))
    for key, val in full.items():
        setattr(a, key, val)
    return a


def main(argv=None) -> int:
    global ARGS, DEV
    ARGS = parse(argv)
    if ARGS.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("bench/triton_kernels.py needs a CUDA GPU (none found); nothing was measured. "
              "Use --smoke to check the script on the CPU.", file=sys.stderr)
        return 2
    os.environ["V4_KERNELS"] = "triton"  # kernel path even if the caller set ref
    import v4kernels as K
    torch.manual_seed(0)
    if not ARGS.smoke:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    sections = dict(norm=bench_rms_norm, swiglu=bench_swiglu, mhc=bench_mhc,
                    attn=bench_sparse_attention, moe=bench_grouped, gram=bench_gram,
                    fp8=bench_fp8)
    for key, fn in sections.items():
        if ARGS.only is None or key in ARGS.only:
            fn(K)
    print("\n| op | shape | kernel ms | ref ms | speedup | kernel throughput | note |")
    print("|---|---|---|---|---|---|---|")
    for row in SPEED:
        print("| " + " | ".join(row) + " |")
    print("\n| bf16 check (kernel vs fp32 ref) | worst err/tol | rel. Frobenius | result |")
    print("|---|---|---|---|")
    for row in CORRECT:
        print("| " + " | ".join(row) + " |")
    print("\nGoals:\n" + "\n".join(f"- {g}" for g in GOALS))
    if ARGS.smoke:
        print("\n(--smoke: CPU interpreter, timings are meaningless)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
