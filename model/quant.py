"""The released checkpoints' weight formats (spec §7), dequantised on load.

- FP8: `float8_e4m3fn` weights with one power-of-two scale per 128×128 block (`ue8m0`, stored as
  `float8_e8m0fnu`, or raw `uint8` exponents, or float32 in older `weight_scale_inv` files):
  w = fp8 · scale[block].
- FP4 (routed experts): e2m1 values packed two per byte along the input dim, the element with
  the even index in the low nibble, with one e8m0 scale per 1×32 block: w = e2m1 · scale.

The quantisers are the inverse (power-of-two scales that keep the block's max in range, values
rounded to nearest) and exist for tests and round trips; training never quantises.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_BLOCK = 32
# e2m1 code (sign bit 3, exponent bits 2-1, mantissa bit 0) -> value
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                           -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Block scales of any stored dtype → fp32 (`uint8` is read as a raw e8m0 exponent)."""
    if scale.dtype == torch.uint8:
        return torch.ldexp(torch.ones_like(scale, dtype=torch.float32), scale.int() - 127)
    return scale.float()


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor,
                block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """weight `[rows, cols]` e4m3, scale `[ceil(rows/br), ceil(cols/bc)]` → fp32 `[rows, cols]`."""
    rows, cols = weight.shape
    br, bc = block
    expected = (-(-rows // br), -(-cols // bc))
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP8 scale shape {tuple(scale.shape)} does not match weight "
                         f"{tuple(weight.shape)} with {br}x{bc} blocks (expected {expected})")
    s = scale_to_float(scale).repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return weight.float() * s


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """`[rows, cols/2]` bytes (int8, uint8 or float4_e2m1fn_x2) → fp32 e2m1 values `[rows, cols]`."""
    b = packed.view(torch.uint8).long()
    low, high = b & 0x0F, (b >> 4) & 0x0F
    table = FP4_VALUES.to(packed.device)
    return torch.stack((table[low], table[high]), dim=-1).flatten(-2)


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """packed `[rows, cols/2]`, scale `[rows, cols/block]` → fp32 `[rows, cols]`."""
    values = unpack_fp4(packed)
    rows, cols = values.shape
    if tuple(scale.shape) != (rows, cols // block) or cols % block:
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match packed weight "
                         f"{tuple(packed.shape)} ({cols} values per row, 1x{block} blocks: "
                         f"expected {(rows, cols // block)})")
    return values * scale_to_float(scale).repeat_interleave(block, 1)


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= qmax (1 for all-zero blocks)."""
    ratio = (amax / qmax).clamp_min(2.0 ** -126)
    return torch.exp2(torch.ceil(torch.log2(ratio)))


def quant_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)):
    """fp32 `[rows, cols]` → (e4m3 weight, e8m0 scales `[ceil(rows/br), ceil(cols/bc)]`)."""
    rows, cols = weight.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = weight.float().new_zeros(nr * br, nc * bc)
    padded[:rows, :cols] = weight.float()
    amax = padded.view(nr, br, nc, bc).abs().amax(dim=(1, 3))  # [nr, nc]
    scale = _pow2_scale(amax, FP8_MAX)
    full = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (weight.float() / full).to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def quant_fp4(weight: torch.Tensor, block: int = FP4_BLOCK):
    """fp32 `[rows, cols]` → (packed int8 `[rows, cols/2]`, e8m0 scales `[rows, cols/block]`);
    values round to the nearest e2m1 magnitude."""
    rows, cols = weight.shape
    if cols % block or cols % 2:
        raise ValueError(f"FP4 needs cols divisible by {block}, got {cols}")
    w = weight.float().view(rows, cols // block, block)
    scale = _pow2_scale(w.abs().amax(-1), FP4_MAX)  # [rows, cols/block]
    x = (w / scale[..., None]).flatten(1)
    mags = FP4_VALUES[:8].to(weight.device)
    code = (x.abs()[..., None] - mags).abs().argmin(-1)  # [rows, cols] in 0..7
    code = code + 8 * (x < 0).long()
    byte = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)
    return byte.view(torch.int8), scale.to(torch.float8_e8m0fnu)
