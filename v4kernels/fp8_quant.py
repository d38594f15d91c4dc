"""FP8 block quantisation of activations (K8): 1×block tiles, power-of-two scales, E4M3.

For every row and every `block` consecutive values (V4/V3: 128) along the last dim:

    amax  = max(|x|, 1e-4)                       (floor keeps all-zero tiles finite)
    scale = 2^ceil(log2(amax / 448))             (448 = largest finite E4M3 value)
    q     = cast_e4m3(x / scale)                 (round to nearest even; |x/scale| ≤ 448)

Dequantise with q·scale. Why power-of-two scales: dividing by one is exact, the scale can be
stored as an exponent (UE8M0, what SM100 FP8 GEMMs consume), and rescaling never adds error
beyond the E4M3 rounding itself. Why a kernel: one read of x and one write of q (1 byte) per value,
instead of eager PyTorch's abs/amax/divide/cast passes over fp32 temporaries.

ceil(log2(·)) is taken from the float's bits (exponent, plus one if the mantissa is non-zero), not
from `log2`, whose rounding can land on the integer just below and give a scale that is too small.
No backward: FP8 training quantises in the forward of a GEMM and keeps high-precision gradients.
"""

from __future__ import annotations

import torch

from .dispatch import lazy_jit, next_pow2, tl, use_triton

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)


# ------------------------------------------------------------------------------- reference
def pow2_scale_ref(amax: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(max(amax, floor) / 448)), exact (via frexp), fp32."""
    v = amax.float().clamp(min=AMAX_FLOOR) / FP8_MAX
    mant, exp = torch.frexp(v)                                             # v = mant·2^exp
    exp = exp - (mant == 0.5).to(exp.dtype)                                # exact powers of two
    return torch.ldexp(torch.ones_like(v), exp)


def fp8_block_quant_ref(x: torch.Tensor, block: int = 128):
    """x [..., K] -> (q [..., K] float8_e4m3fn, scales [..., cdiv(K, block)] fp32)."""
    if FP8_DTYPE is None:
        raise RuntimeError("this torch has no float8_e4m3fn")
    k = x.shape[-1]
    nb = -(-k // block)
    xf = torch.nn.functional.pad(x.float(), (0, nb * block - k)).unflatten(-1, (nb, block))
    scales = pow2_scale_ref(xf.abs().amax(-1))                             # [..., nb]
    q = (xf * (1.0 / scales)[..., None]).flatten(-2)[..., :k].to(FP8_DTYPE)
    return q, scales


def fp8_block_dequant(q: torch.Tensor, scales: torch.Tensor, block: int = 128,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of the quantisation (up to E4M3 rounding): q·scale per block."""
    k = q.shape[-1]
    s = scales.float().repeat_interleave(block, dim=-1)[..., :k]
    return (q.float() * s).to(dtype)


# ------------------------------------------------------------------------------- kernel
@lazy_jit
def _fp8_quant_kernel(x_ptr, q_ptr, s_ptr, K, n_blocks, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * K + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4) / 448.0
    bits = v.to(tl.int32, bitcast=True)                                    # v > 0, normal
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)      # biased ceil(log2)
    scale = (e << 23).to(tl.float32, bitcast=True)                         # 2^(e − 127)
    inv = ((254 - e) << 23).to(tl.float32, bitcast=True)                   # 1/scale, exact
    y = x * inv                                                            # |y| ≤ 448, exact
    # Round to the E4M3 grid ourselves (nearest even; spacing 2^(max(exp, −6) − 3)) so the cast
    # below is exact: the interpreter's fp32→fp8 cast drops the carry when rounding crosses a
    # power of two (7.84 → 4 instead of 8). On a GPU this equals the hardware's RTNE cast.
    y_exp = tl.maximum((y.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)
    ulp = ((y_exp - 3) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((254 - (y_exp - 3)) << 23).to(tl.float32, bitcast=True)
    y = ((y * inv_ulp + 12582912.0) - 12582912.0) * ulp                    # 1.5·2^23: rint
    tl.store(q_ptr + row * K + cols, y.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + row * n_blocks + blk, scale)


def fp8_block_quant_fwd(x2: torch.Tensor, block: int):
    rows, k = x2.shape
    nb = -(-k // block)
    q = torch.empty(rows, k, device=x2.device, dtype=FP8_DTYPE)
    s = torch.empty(rows, nb, device=x2.device, dtype=torch.float32)
    if rows and k:
        _fp8_quant_kernel[(rows, nb)](x2, q, s, k, nb, BLOCK=block)
    return q, s


# ------------------------------------------------------------------------------- dispatcher
def fp8_block_quant(x: torch.Tensor, block: int = 128):
    """x [..., K] (any float dtype) -> (q [..., K] float8_e4m3fn, scales [..., cdiv(K, block)]
    fp32, powers of two). A ragged last block is quantised over its valid values."""
    if FP8_DTYPE is None:
        raise RuntimeError("this torch has no float8_e4m3fn")
    if block != next_pow2(block):
        raise ValueError(f"block={block}: must be a power of two")
    if use_triton(x):
        lead, k = x.shape[:-1], x.shape[-1]
        q, s = fp8_block_quant_fwd(x.reshape(-1, k).contiguous(), block)
        return q.view(*lead, k), s.view(*lead, -1)
    return fp8_block_quant_ref(x, block)
