"""FP8 block quantisation kernel vs reference: bit-exact codes and power-of-two scales."""

import pytest
import torch

from v4kernels import fp8_block_dequant, fp8_block_quant, fp8_block_quant_ref
from tests.kernels._util import DEVICE, randn

pytestmark = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 in torch")


def _input(rows, k):
    """Rows spanning 6 orders of magnitude, a zero row, a value that is exactly 448·2^-3 (a
    power-of-two boundary), values that round up across a power of two, and a ragged tail."""
    x = randn(rows, k) * torch.logspace(-3, 3, rows, device=DEVICE)[:, None]
    x[1] = 0
    x[2, 3] = 448 * 2.0 ** -3
    x[3, :4] = torch.tensor([7.84, -15.9, 0.0615, 239.0], device=DEVICE)
    return x


@pytest.mark.parametrize("rows, k, block, dtype", [(6, 100, 32, torch.float32),
                                                   (5, 256, 128, torch.float32),
                                                   (4, 64, 64, torch.float16)])
def test_matches_reference_bit_exact(rows, k, block, dtype):
    x = _input(rows, k).to(dtype)
    q, s = fp8_block_quant(x, block)
    q_r, s_r = fp8_block_quant_ref(x, block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (rows, -(-k // block))
    assert torch.equal(q.view(torch.uint8), q_r.view(torch.uint8))
    assert torch.equal(s, s_r)


def test_scales_are_tight_powers_of_two_and_roundtrip():
    x = _input(6, 96)
    q, s = fp8_block_quant(x, 32)
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all()                                   # powers of two
    amax = x.abs().unflatten(-1, (3, 32)).amax(-1).clamp(min=1e-4)
    assert (amax <= 448 * s).all() and (amax > 224 * s).all()    # the smallest such power
    assert (q.float().abs() <= 448).all()
    err = (fp8_block_dequant(q, s, 32) - x).abs().unflatten(-1, (3, 32))
    # E4M3 keeps 3 mantissa bits: error ≤ 2^-4 relative to the value, or to the block floor
    bound = torch.maximum(x.abs().unflatten(-1, (3, 32)) * 2 ** -4, (s * 2 ** -9)[..., None])
    assert (err <= bound).all()
    assert s[2, 0] == 2.0 ** -3                                  # exact power: no extra bit


def test_leading_dims_and_bad_block():
    q, s = fp8_block_quant(randn(2, 3, 64), 32)
    assert q.shape == (2, 3, 64) and s.shape == (2, 3, 2)
    with pytest.raises(ValueError):
        fp8_block_quant(randn(2, 64), 48)
