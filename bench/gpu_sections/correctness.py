"""Section 2, correctness: every Triton kernel against its PyTorch reference at the tiny, small
and flash per-layer shapes (up to 8K tokens), forward and backward, then the whole model's
forward and backward with the kernels on against the references.

Tolerances. A kernel gets bf16 inputs; its reference runs in fp32 on the same bf16-rounded values,
so the only differences are the kernel's own rounding: its bf16 output (≤ 2^-9 relative, round to
nearest) and fp32 accumulation in another order or with bf16 intermediates (≈ 2^-9 per term,
adding up as √K over a K-term sum, which is √K times larger too). An element passes when
|kernel − ref| ≤ atol + rtol·|ref| with rtol = 1.6e-2 (torch.testing's bf16 default: 8× the output
rounding) and atol = 1e-2·RMS(ref): entries that cancel to nearly 0 carry the error of the terms
they sum, not of themselves, and that error, relative to the result's RMS, is about 2^-9 ≈ 2e-3,
5× below atol. fp32 kernels (mHC's 20 Sinkhorn rounds) use rtol 1e-4 and atol 1e-5·RMS: twenty
rounds of normalisation amplify fp32 rounding (~6e-8) by well under 10^3. FP8 quantisation must
match bit for bit (the scales are powers of two and the cast is deterministic). The expert
block (two up-projections, SwiGLU, the down-projection) rounds to bf16 three times in a chain,
each rounding adding the error of one op, so it gets three times one op's tolerance.

Sizes. Tokens per call: 8192 on a GPU (32 with `--tiny`). Sparse attention runs at the longest
length (≤ 8192) whose fp32 reference fits 8 GiB (the reference gathers [S, K, C] key/values);
the grouped expert GEMMs use at most 32 experts with the preset's rows per expert (the tiling
per expert is what is checked; 256 flash experts' weights in three copies would not fit).

The model check: the same weights and tokens through forward and backward with
`V4_KERNELS=triton` and `V4_KERNELS=ref`. bf16 activations round at every op and the difference
compounds over layers, so the loss must agree to 2 % and the gradients to 5 % relative Frobenius
(fp32 with `--tiny`: 1e-4 and 1e-3).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from model.config import get_config

from .common import Ctx, Result, bench_module, guarded

kb = bench_module("triton_kernels")  # bench/triton_kernels.py

BF16 = (1.6e-2, 1e-2)   # (rtol, atol relative to the reference's RMS)
FP32 = (1e-4, 1e-5)
EXPERTS = (4.8e-2, 3e-2)  # three bf16 roundings in a chain: three times one op's tolerance


def compare(r: Result, what: str, got: torch.Tensor, want: torch.Tensor, tol=BF16) -> None:
    rtol, rel_atol = tol
    got, want = got.detach().float(), want.detach().float()
    rms = want.pow(2).mean().sqrt().item() if want.numel() else 0.0
    atol = max(rel_atol * rms, 1e-30)
    worst = ((got - want).abs() / (atol + rtol * want.abs())).max().item() if want.numel() else 0
    frob = ((got - want).norm() / want.norm().clamp(min=1e-30)).item()
    ok = worst <= 1.0
    r.add(what, f"{worst:.3g}", f"{frob:.2e}", "PASS" if ok else "FAIL")
    if not ok:
        r.failed.append(f"{what}: worst error/tolerance {worst:.3g}")


def with_grads(fn, inputs, seed):
    out = fn()
    out_t = out if torch.is_tensor(out) else torch.cat([t.flatten(1) for t in out], 1)
    return [out_t] + list(torch.autograd.grad(out_t, inputs, seed, allow_unused=True))


def fp32_leaves(*ts):
    return [t.detach().float().requires_grad_() for t in ts]


def rand(ctx, *shape, dtype=torch.bfloat16, scale=1.0, grad=True):
    t = (torch.randn(*shape, device=ctx.device) * scale).to(dtype)
    return t.requires_grad_(grad)


def check_kernels(ctx: Ctx, r: Result, preset: str, cfg, tokens: int) -> None:
    import v4kernels as K

    tag = f"{preset}"
    T, dim, inter = tokens, cfg.dim, cfg.moe_inter_dim
    x, w = rand(ctx, T, dim), rand(ctx, dim, dtype=torch.float32)
    g = rand(ctx, T, dim, grad=False)
    got = with_grads(lambda: K.rms_norm(x, w, cfg.norm_eps), (x, w), g)
    xf, wf = fp32_leaves(x, w)
    want = with_grads(lambda: K.rms_norm_ref(xf, wf, cfg.norm_eps), (xf, wf), g.float())
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        compare(r, f"{tag} rms_norm {name} [{T}, {dim}]", a, b)

    gate, up = rand(ctx, T, inter, scale=4), rand(ctx, T, inter, scale=4)
    g = rand(ctx, T, inter, dtype=torch.float32, grad=False)
    got = with_grads(lambda: K.swiglu(gate, up, cfg.swiglu_limit), (gate, up), g)
    gf, uf = fp32_leaves(gate, up)
    want = with_grads(lambda: K.swiglu_ref(gf, uf, cfg.swiglu_limit), (gf, uf), g)
    for name, a, b in zip(("h", "dgate", "dup"), got, want):
        compare(r, f"{tag} swiglu {name} [{T}, {inter}]", a, b)

    hc, width = cfg.hc_mult, (2 + cfg.hc_mult) * cfg.hc_mult
    m = rand(ctx, T, width, dtype=torch.float32)
    sc = (torch.rand(3, device=ctx.device) + 0.5).requires_grad_()
    base = rand(ctx, width, dtype=torch.float32)
    seed = torch.randn(T, 2 * hc + hc * hc, device=ctx.device)
    args = (hc, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    got = with_grads(lambda: K.hc_split_sinkhorn(m, sc, base, *args), (m, sc, base), seed)
    want = with_grads(lambda: K.hc_split_sinkhorn_ref(m, sc, base, *args), (m, sc, base), seed)
    for name, a, b in zip(("pre|post|comb", "dmixes", "dscale", "dbase"), got, want):
        compare(r, f"{tag} mhc {name} [{T}, {width}] fp32", a, b, FP32)
    check_attention(ctx, r, tag, cfg, tokens)
    check_experts(ctx, r, tag, cfg, tokens)
    q8, s8 = K.fp8_block_quant(x.detach()[:256])
    q8r, s8r = K.fp8_block_quant_ref(x.detach()[:256])
    same = torch.equal(q8.view(torch.uint8), q8r.view(torch.uint8)) and torch.equal(s8, s8r)
    r.add(f"{tag} fp8_block_quant [256, {dim}]", "bit-exact" if same else "differs", "-",
          "PASS" if same else "FAIL")
    if not same:
        r.failed.append(f"{tag} fp8_block_quant is not bit-exact")


def attention_length(cfg, tokens: int) -> int:
    keys = cfg.window_size + cfg.index_topk
    s = tokens
    while s > 16 and s * keys * cfg.head_dim * 4 * 4 > 8 * 2**30:
        s //= 2
    return s


def check_attention(ctx: Ctx, r: Result, tag: str, cfg, tokens: int) -> None:
    import v4kernels as K

    kb.DEV = str(ctx.device)
    s, c = attention_length(cfg, tokens), cfg.head_dim
    q, kv, idx, sink = kb._attn_inputs(s, cfg.n_heads, c, cfg.index_topk, cfg.window_size,
                                       torch.bfloat16, grad=True)
    idx[0, :3] = -1                                                  # empty lists too
    g = torch.randn(1, s, cfg.n_heads, c, device=ctx.device)
    scale = c ** -0.5
    got = with_grads(lambda: K.sparse_attention(q, kv, idx, sink, scale), (q, kv, sink), g)
    qf, kvf = fp32_leaves(q, kv)
    want = with_grads(lambda: K.sparse_attention_ref(qf, kvf, idx, sink, scale),
                      (qf, kvf, sink), g)
    shape = f"s={s} h={cfg.n_heads} c={c} k={cfg.window_size + cfg.index_topk}"
    for name, a, b in zip(("out", "dq", "dkv", "dsink"), got, want):
        compare(r, f"{tag} sparse_attention {name} {shape}", a, b)


def check_experts(ctx: Ctx, r: Result, tag: str, cfg, tokens: int) -> None:
    import v4kernels as K

    n_exp = min(cfg.n_routed_experts, 32)
    rows = max(1, tokens * cfg.n_activated_experts // cfg.n_routed_experts)
    counts = torch.full((n_exp,), rows, device=ctx.device)
    counts[1] = 0                                                     # an empty expert
    n, dim, inter = int(counts.sum()), cfg.dim, cfg.moe_inter_dim
    x = rand(ctx, n, dim)
    w1, w3 = rand(ctx, n_exp, inter, dim, scale=dim ** -0.5), rand(ctx, n_exp, inter, dim,
                                                                    scale=dim ** -0.5)
    w2 = rand(ctx, n_exp, dim, inter, scale=inter ** -0.5)
    weights = torch.rand(n, device=ctx.device)
    g = rand(ctx, n, dim, grad=False)
    limit = cfg.swiglu_limit
    got = with_grads(lambda: K.grouped_swiglu_experts(x, counts, weights, w1, w3, w2, limit),
                     (x, w1, w3, w2), g)
    leaves = fp32_leaves(x, w1, w3, w2)
    want = with_grads(lambda: K.grouped_swiglu_experts_ref(leaves[0], counts, weights,
                                                           *leaves[1:], limit), leaves, g.float())
    shape = f"E={n_exp} N={n} d={dim} I={inter}"
    for name, a, b in zip(("y", "dx", "dw1", "dw3", "dw2"), got, want):
        compare(r, f"{tag} experts {name} {shape}", a, b, EXPERTS)
    k = cfg.n_activated_experts
    t = max(1, n // k)
    xt = rand(ctx, t, dim)
    ids = torch.rand(t, cfg.n_routed_experts, device=ctx.device).topk(k, -1).indices
    wts = torch.rand(t, k, device=ctx.device)
    gt = torch.randn(t, dim, device=ctx.device)
    from v4kernels.moe_permute import sort_by_expert

    def roundtrip(ref: bool, src):
        if ref:
            order, inverse, _ = sort_by_expert(ids, cfg.n_routed_experts)
            return K.moe_unpermute_ref(K.moe_permute_ref(src, order, k), inverse, k, wts)
        y, _, order, inverse = K.moe_permute(src, ids, cfg.n_routed_experts)
        return K.moe_unpermute(y, inverse, order, k, wts)
    got = with_grads(lambda: roundtrip(False, xt), (xt,), gt)
    (xtf,) = fp32_leaves(xt)
    want = with_grads(lambda: roundtrip(True, xtf), (xtf,), gt)
    for name, a, b in zip(("out", "dx"), got, want):
        compare(r, f"{tag} permute+unpermute {name} T={t} k={k}", a, b)


@contextmanager
def kernel_mode(mode: str):
    old = os.environ.get("V4_KERNELS")
    os.environ["V4_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("V4_KERNELS", None)
        else:
            os.environ["V4_KERNELS"] = old


def check_model(ctx: Ctx, r: Result, preset: str, seq: int) -> None:
    """The whole model, forward and backward, kernels on against kernels off (docstring)."""
    from model.loss import compute_loss
    from model.transformer import Transformer

    cfg = get_config(preset)
    if ctx.tiny:
        cfg = cfg.replace(dim=64, n_heads=2, head_dim=32, rope_head_dim=8, q_lora_rank=32,
                          o_lora_rank=32, o_groups=2, index_n_heads=2, index_head_dim=16,
                          index_topk=4, window_size=8, moe_inter_dim=32, n_routed_experts=4,
                          vocab_size=512)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    torch.manual_seed(0)
    with ctx.device:
        model = Transformer(cfg).to(dtype)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device=ctx.device)
    results = {}
    for mode in ("triton", "ref"):
        with kernel_mode(mode):
            model.zero_grad(set_to_none=True)
            loss = compute_loss(model(ids), ids).total
            loss.backward()
            results[mode] = (loss.item(), [p.grad.detach().float().clone()
                                           for p in model.parameters() if p.grad is not None])
    (l_k, g_k), (l_r, g_r) = results["triton"], results["ref"]
    loss_tol, grad_tol = (2e-2, 5e-2) if ctx.cuda else (1e-4, 1e-3)
    num = sum((a - b).pow(2).sum() for a, b in zip(g_k, g_r)).sqrt().item()
    den = sum(b.pow(2).sum() for b in g_r).sqrt().item()
    rel_loss, rel_grad = abs(l_k - l_r) / abs(l_r), num / max(den, 1e-30)
    ok = rel_loss <= loss_tol and rel_grad <= grad_tol
    r.add(f"model {preset} fwd+bwd, kernels on vs off, {seq} tokens {str(dtype)[6:]}",
          f"loss {rel_loss:.2e} (≤ {loss_tol:g})", f"grads {rel_grad:.2e} (≤ {grad_tol:g})",
          "PASS" if ok else "FAIL")
    if not ok:
        r.failed.append(f"model {preset}: kernels on vs off differ (loss {rel_loss:.2e}, "
                        f"grads {rel_grad:.2e})")


def run(ctx: Ctx) -> Result:
    r = Result("Correctness: Triton kernels vs their PyTorch references",
               ["check", "worst err/tol", "rel. Frobenius", "result"])
    if ctx.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # the CPU self-test runs the kernels interpreted
    presets = ["tiny"] if ctx.tiny else ["tiny", "small", "flash"]
    tokens = 32 if ctx.tiny else 8192
    with kernel_mode("triton"):
        for preset in presets:
            cfg = get_config(preset)
            if ctx.tiny:
                cfg = cfg.replace(dim=48, moe_inter_dim=32, n_heads=2, head_dim=16,
                                  index_topk=8, window_size=4, n_routed_experts=4)
            torch.manual_seed(0)
            guarded(r, f"{preset} kernels", lambda: check_kernels(ctx, r, preset, cfg, tokens))
            if ctx.cuda:
                torch.cuda.empty_cache()
    for preset, seq in ([("tiny", 16)] if ctx.tiny else [("tiny", 1024), ("small", 1024)]):
        guarded(r, f"model {preset}", lambda: check_model(ctx, r, preset, seq))
    r.notes.append("tolerances: bf16 rtol 1.6e-2, atol 1e-2·RMS(ref); fp32 (mHC) rtol 1e-4, "
                   "atol 1e-5·RMS(ref); argued in bench/gpu_sections/correctness.py")
    return r
