"""Fused RMSNorm kernel vs its reference, and the reference vs the model's RMSNorm."""

import pytest
import torch

from v4kernels import rms_norm, rms_norm_ref
from model.norm import RMSNorm, rms_normalize
from tests.kernels._util import close, grads, randn

EPS = 1e-6


@pytest.mark.parametrize("shape, with_weight", [((2, 3, 40), True), ((5, 64), True),
                                                ((4, 17), False)])
def test_forward_backward_fp32(shape, with_weight):
    x = randn(*shape, scale=3.0, grad=True)
    w = (randn(shape[-1]) + 1).requires_grad_() if with_weight else None
    y = rms_norm(x, w, EPS)
    assert type(y.grad_fn).__name__ == "_RMSNormFnBackward"  # the kernel ran, not the ref
    y_ref = rms_norm_ref(x, w, EPS)
    close(y, y_ref, what="y")
    g = randn(*shape)
    inputs = (x, w) if with_weight else (x,)
    for a, b, name in zip(grads([y], inputs, [g]), grads([y_ref], inputs, [g]), ("dx", "dw")):
        close(a, b, what=name)


def test_fp16_input_keeps_dtype():
    """fp16 in/out; fp32 math in both, so they differ by at most about one fp16 rounding."""
    x = randn(6, 48, dtype=torch.float16, grad=True)
    w = randn(48, grad=True)
    y, y_ref = rms_norm(x, w, EPS), rms_norm_ref(x, w, EPS)
    assert y.dtype == torch.float16
    close(y, y_ref, atol=1e-3, rtol=1e-3, what="y fp16")
    g = randn(6, 48, dtype=torch.float16)
    (dx, dw), (dx_r, dw_r) = grads([y], (x, w), [g]), grads([y_ref], (x, w), [g])
    assert dx.dtype == torch.float16 and dw.dtype == torch.float32
    close(dx, dx_r, atol=2e-3, rtol=2e-3, what="dx fp16")
    close(dw, dw_r, atol=1e-3, rtol=1e-3, what="dw fp16")


def test_empty_input():
    x = randn(0, 8, grad=True)
    assert rms_norm(x, torch.ones(8, device=x.device), EPS).shape == (0, 8)


@pytest.mark.reference_only
def test_reference_equals_model(monkeypatch):
    monkeypatch.setenv("V4_KERNELS", "ref")
    x = torch.randn(3, 5, 32).half()
    norm = RMSNorm(32, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    assert torch.equal(rms_norm(x, norm.weight, EPS), norm(x))
    assert torch.equal(rms_norm(x.float(), None, EPS), rms_normalize(x.float(), EPS))
