"""FP8 (e4m3, 128x128 power-of-two block scales) and FP4 (packed e2m1, 1x32 e8m0 scales)
dequantise to the values their bit patterns encode, checked against a per-element decoding
written from the format definitions."""

import math
import random

import pytest
import torch

from model.quant import dequant_fp4, dequant_fp8, quant_fp4, quant_fp8


def _e4m3(code: int) -> float:
    """e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; subnormals at exponent 0."""
    sign = -1.0 if code & 0x80 else 1.0
    exp, man = (code >> 3) & 0xF, code & 0x7
    if exp == 0:
        return sign * man / 8 * 2.0 ** -6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def _e2m1(code: int) -> float:
    """e2m1: 1 sign, 2 exponent (bias 1), 1 mantissa bit; subnormal 0.5 at exponent 0."""
    sign = -1.0 if code & 0x8 else 1.0
    exp, man = (code >> 1) & 0x3, code & 0x1
    return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))


def test_fp8_blocks_decode_bit_patterns():
    rng = random.Random(0)
    rows, cols, block = 300, 260, (128, 128)  # partial blocks at both edges
    codes = [[rng.choice([c for c in range(256) if c & 0x7F != 0x7F]) for _ in range(cols)]
             for _ in range(rows)]
    exps = [[rng.randint(117, 137) for _ in range(3)] for _ in range(3)]  # e8m0 bytes
    weight = torch.tensor(codes, dtype=torch.uint8).view(torch.float8_e4m3fn)
    expected = torch.tensor([[_e4m3(codes[r][c]) * 2.0 ** (exps[r // 128][c // 128] - 127)
                              for c in range(cols)] for r in range(rows)])
    for scale in (torch.tensor(exps, dtype=torch.uint8).view(torch.float8_e8m0fnu),  # released
                  torch.tensor(exps, dtype=torch.uint8),                              # raw bytes
                  torch.tensor([[2.0 ** (e - 127) for e in r] for r in exps])):        # float32
        got = dequant_fp8(weight, scale, block)
        assert torch.equal(got, expected)


def test_fp4_packing_decodes_low_nibble_first():
    rng = random.Random(1)
    rows, cols = 6, 96
    nibbles = [[rng.randrange(16) for _ in range(cols)] for _ in range(rows)]
    packed = torch.tensor([[nibbles[r][2 * j] | (nibbles[r][2 * j + 1] << 4)
                            for j in range(cols // 2)] for r in range(rows)], dtype=torch.uint8)
    exps = [[rng.randint(120, 134) for _ in range(cols // 32)] for _ in range(rows)]
    scale = torch.tensor(exps, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    expected = torch.tensor([[_e2m1(nibbles[r][c]) * 2.0 ** (exps[r][c // 32] - 127)
                              for c in range(cols)] for r in range(rows)])
    for stored in (packed.view(torch.int8), packed, packed.view(torch.float4_e2m1fn_x2)):
        assert torch.equal(dequant_fp4(stored, scale), expected)


def test_quantisers_round_trip_within_format_precision():
    w = torch.randn(256, 384) * torch.logspace(-3, 1, 384)  # columns of very different scales
    q, s = quant_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s.shape == (2, 3)
    back = dequant_fp8(q, s)
    big = w.abs() > 1e-2 * w.abs().amax()  # away from the block's subnormal range
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + 1e-12)[big].all()  # 3 mantissa bits
    q4, s4 = quant_fp4(w)
    assert q4.shape == (256, 192) and s4.shape == (256, 12)
    back4 = dequant_fp4(q4, s4)
    step = s4.float().repeat_interleave(32, 1)  # e2m1 spacing is at most 2 scale units
    assert ((back4 - w).abs() <= step).all()
    assert torch.equal(dequant_fp4(*quant_fp4(back4)), back4)  # representable values are fixed


def test_scale_shape_mismatch_is_reported():
    w = torch.zeros(256, 128, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"expected \(2, 1\)"):
        dequant_fp8(w, torch.ones(1, 1))
    with pytest.raises(ValueError, match="FP4 scale shape"):
        dequant_fp4(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1))
    assert math.isclose(float(dequant_fp8(w, torch.ones(2, 1)).abs().sum()), 0.0)
