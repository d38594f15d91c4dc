"""Clamped SwiGLU kernel vs its reference, and the reference vs `model.moe.swiglu`."""

import pytest
import torch

from v4kernels import swiglu, swiglu_ref
from model.moe import swiglu as model_swiglu
from tests.kernels._util import close, grads, randn


@pytest.mark.parametrize("limit", [5.0, 0.0])
def test_forward_backward_fp32(limit):
    """Values of std 8 cross both clamps (limit 5); limit 0 turns the clamp off."""
    gate, up = randn(7, 300, scale=8.0, grad=True), randn(7, 300, scale=8.0, grad=True)
    h = swiglu(gate, up, limit)
    assert type(h.grad_fn).__name__ == "_SwiGLUFnBackward"
    h_ref = swiglu_ref(gate, up, limit)
    assert h.dtype == torch.float32
    close(h, h_ref, what="h")
    g = randn(7, 300)
    dg, du = grads([h], (gate, up), [g])
    dg_r, du_r = grads([h_ref], (gate, up), [g])
    close(dg, dg_r, what="d gate")
    close(du, du_r, what="d up")
    if limit > 0:  # the clamp really blocks gradients
        assert (du[up.detach().abs() > limit] == 0).all()
        assert (dg[gate.detach() > limit] == 0).all()
        assert (up.detach().abs() > limit).any() and (gate.detach() > limit).any()


def test_fp16_inputs_and_out_dtype():
    gate = randn(4, 64, scale=4.0, dtype=torch.float16, grad=True)
    up = randn(4, 64, scale=4.0, dtype=torch.float16, grad=True)
    h = swiglu(gate, up, 3.0, out_dtype=torch.float16)
    assert h.dtype == torch.float16
    close(h, swiglu_ref(gate, up, 3.0, torch.float16), atol=1e-3, rtol=1e-3, what="h fp16")
    h32 = swiglu(gate, up, 3.0)
    assert h32.dtype == torch.float32
    close(h32, swiglu_ref(gate, up, 3.0), what="h fp32 from fp16")
    g = randn(4, 64)
    for a, b in zip(grads([h32], (gate, up), [g]), grads([swiglu_ref(gate, up, 3.0)], (gate, up),
                                                         [g])):
        assert a.dtype == torch.float16
        close(a, b, atol=1e-3, rtol=1e-3, what="grad fp16")


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        swiglu(randn(2, 3), randn(3, 2), 1.0)


@pytest.mark.reference_only
def test_reference_equals_model(monkeypatch):
    monkeypatch.setenv("V4_KERNELS", "ref")
    gate, up = torch.randn(5, 33).bfloat16() * 12, torch.randn(5, 33).bfloat16() * 12
    for limit in (10.0, 0.0):
        out = swiglu(gate, up, limit)
        assert out.dtype == torch.float32
        assert torch.equal(out, model_swiglu(gate, up, limit))
