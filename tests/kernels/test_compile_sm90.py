"""Ahead-of-time compilation of every kernel for an H100/H200 (sm_90) with the GPU tile configs.

No GPU is needed: Triton lowers TTIR → TTGIR → LLVM → PTX → cubin (its bundled ptxas) for a
given target. This catches what the CPU interpreter cannot: type errors in the compiled dialect,
bf16/fp16 `tl.dot` operand rules, fp8 casts, tile shapes below the tensor-core minimum, and
register/shared-memory overflow at V4's real widths (c = 512, dim 7168). It does not check
numerics or speed on a GPU.
"""

import pytest

from v4kernels import dispatch
from v4kernels.dispatch import DOT_BF16, DOT_FP32

pytestmark = pytest.mark.skipif(not dispatch.HAS_TRITON, reason="needs triton")


def _compile(lazy, types, constexprs, num_warps=4, ones=(), div16=()):
    """Compile `lazy` for sm_90 the way a real launch specialises it: integer arguments equal
    to 1 (unit strides, `ones`) become constants, and pointers plus the integers in `div16` carry
    Triton's divisibility-by-16 hint."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = triton.jit(lazy.fn)
    params = list(fn.arg_names)
    constexprs = dict(constexprs, **{name: 1 for name in ones})
    signature = {p: ("constexpr" if p in constexprs else types[p]) for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
             if p not in constexprs and (types[p].startswith("*") or p in div16)}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    assert kernel.asm["cubin"], lazy.fn.__name__
    return kernel


@pytest.fixture(autouse=True)
def compiled_mode(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))      # really compile, every time
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")         # triton 3.9's default, explicit
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    if not isinstance(tl.sum, JITFunction):
        pytest.skip("triton was imported in interpreter mode (TRITON_INTERPRET=1 process-wide)")
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend")


def _types(**kw):
    return kw


def test_rms_norm_and_swiglu():
    from v4kernels.rms_norm import _rms_bwd_kernel, _rms_fwd_kernel
    from v4kernels.swiglu import _swiglu_bwd_kernel, _swiglu_fwd_kernel
    _compile(_rms_fwd_kernel, _types(x_ptr="*bf16", w_ptr="*fp32", y_ptr="*bf16",
                                     rstd_ptr="*fp32", n_cols="i32", eps="fp32"),
             dict(HAS_W=True, BLOCK=8192), num_warps=16, div16=("n_cols",))
    _compile(_rms_bwd_kernel, _types(x_ptr="*bf16", w_ptr="*fp32", dy_ptr="*bf16",
                                     rstd_ptr="*fp32", dx_ptr="*bf16", dw_part_ptr="*fp32",
                                     n_rows="i32", n_cols="i32", rows_per_prog="i32"),
             dict(HAS_W=True, BLOCK=4096), num_warps=8, div16=("n_cols",))
    common = _types(g_ptr="*bf16", u_ptr="*bf16", n="i64", limit="fp32")
    _compile(_swiglu_fwd_kernel, dict(common, h_ptr="*fp32"), dict(CLAMP=True, BLOCK=1024))
    _compile(_swiglu_bwd_kernel, dict(common, dh_ptr="*fp32", dg_ptr="*bf16", du_ptr="*bf16"),
             dict(CLAMP=True, BLOCK=1024))


def test_mhc():
    from v4kernels.mhc import BLOCK_T, _mhc_bwd_kernel, _mhc_fwd_kernel
    base = _types(m_ptr="*fp32", scale_ptr="*fp32", base_ptr="*fp32", n_tok="i32",
                  iters="i32", eps="fp32")
    consts = dict(HC=4, HCP=4, BLOCK_T=BLOCK_T)
    _compile(_mhc_fwd_kernel, dict(base, pre_ptr="*fp32", post_ptr="*fp32", comb_ptr="*fp32"),
             consts)
    _compile(_mhc_bwd_kernel, dict(base, dpre_ptr="*fp32", dpost_ptr="*fp32",
                                   dcomb_ptr="*fp32", dz_ptr="*fp32"), consts)


@pytest.mark.parametrize("dot, dtype, block_c", [(DOT_BF16, "bf16", 512), (DOT_FP32, "fp32", 64)])
def test_sparse_attention(dot, dtype, block_c):
    from v4kernels.sparse_attention import BLOCK_K, _sparse_attn_bwd_kernel, _sparse_attn_fwd_kernel
    dims = _types(S="i32", H="i32", N="i32", C="i32", K="i32", scale="fp32")
    consts = dict(DOT=dot, BLOCK_H=16, BLOCK_K=BLOCK_K, BLOCK_C=block_c)
    warps = 8 if block_c >= 256 else 4
    _compile(_sparse_attn_fwd_kernel,
             dict(dims, q_ptr=f"*{dtype}", kv_ptr=f"*{dtype}", idx_ptr="*i32", sink_ptr="*fp32",
                  o_ptr=f"*{dtype}", lse_ptr="*fp32"), consts, warps, div16=("H", "C", "K"))
    _compile(_sparse_attn_bwd_kernel,
             dict(dims, q_ptr=f"*{dtype}", kv_ptr=f"*{dtype}", idx_ptr="*i32", do_ptr=f"*{dtype}",
                  lse_ptr="*fp32", delta_ptr="*fp32", dq_ptr=f"*{dtype}", dkv_ptr="*fp32"),
             consts, warps, div16=("H", "C", "K"))


def test_grouped_gemm_permute_gram_fp8():
    from v4kernels.fp8_quant import _fp8_quant_kernel
    from v4kernels.grouped_gemm import GPU_CFG, _gmm_dw_kernel, _gmm_fwd_kernel
    from v4kernels.moe_permute import _gather_rows_kernel, _sum_copies_kernel
    from v4kernels.newton_schulz import GPU_CFG as GRAM_CFG
    from v4kernels.newton_schulz import _gram_kernel
    cfg = {k: v for k, v in GPU_CFG.items() if k != "num_warps"}
    strides = {s: "i32" for s in ("sxn", "sxk", "swe", "swk", "swm", "syn", "sym")}
    _compile(_gmm_fwd_kernel, dict(strides, x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16",
                                   tile_group_ptr="*i64", tile_first_ptr="*i64",
                                   group_start_ptr="*i64", counts_ptr="*i64", n_exp="i32",
                                   K="i32", M="i32"), dict(cfg, DOT=DOT_BF16),
             GPU_CFG["num_warps"], ones=("sxk", "swk", "sym"), div16=("sxn", "swe", "swm", "syn",
                                                                    "K", "M"))
    _compile(_gmm_dw_kernel, dict(strides, x_ptr="*bf16", dy_ptr="*bf16", dw_ptr="*fp32",
                                  group_start_ptr="*i64", counts_ptr="*i64", K="i32", M="i32"),
             dict(cfg, DOT=DOT_BF16), GPU_CFG["num_warps"], ones=("sxk", "sym"),
             div16=("sxn", "syn", "K", "M"))
    _compile(_gather_rows_kernel, _types(src_ptr="*bf16", idx_ptr="*i64", scale_ptr="*fp32",
                                         dst_ptr="*bf16", d="i32"),
             dict(DIV=6, HAS_SCALE=True, BLOCK_D=128), div16=("d",))
    _compile(_sum_copies_kernel, _types(src_ptr="*bf16", inv_ptr="*i64", w_ptr="*fp32",
                                        dst_ptr="*fp32", d="i32"),
             dict(TOPK=6, HAS_W=True, BLOCK_D=128), div16=("d",))
    gcfg = {k: v for k, v in GRAM_CFG.items() if k != "num_warps"}
    _compile(_gram_kernel, _types(x_ptr="*bf16", pair_i_ptr="*i32", pair_j_ptr="*i32",
                                  a_ptr="*bf16", M="i32", N="i32", sxb="i32", sxm="i32",
                                  sxn="i32"), dict(gcfg, DOT=DOT_BF16), GRAM_CFG["num_warps"],
             ones=("sxn",), div16=("M", "N", "sxb", "sxm"))
    _compile(_fp8_quant_kernel, _types(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", K="i32",
                                       n_blocks="i32"), dict(BLOCK=128), div16=("K",))


def test_compiles_after_an_interpreted_launch(monkeypatch):
    """Interpreted launches must not leave triton.language patched for the interpreter: a
    compile in the same process afterwards still works (v4kernels.dispatch scopes the patches)."""
    import torch

    from v4kernels.rms_norm import _rms_fwd_kernel, rms_norm_fwd
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y, _ = rms_norm_fwd(torch.randn(3, 40), torch.ones(40), 1e-6)
    assert torch.isfinite(y).all()
    monkeypatch.delenv("TRITON_INTERPRET")
    _compile(_rms_fwd_kernel, _types(x_ptr="*fp32", w_ptr="*fp32", y_ptr="*fp32",
                                     rstd_ptr="*fp32", n_cols="i32", eps="fp32"),
             dict(HAS_W=True, BLOCK=64))
