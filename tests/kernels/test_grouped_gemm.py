"""Grouped GEMM and grouped SwiGLU experts vs the references and `model.moe`."""

import pytest
import torch

from v4kernels import grouped_mm, grouped_mm_ref, grouped_swiglu_experts
from model.moe import experts_padded
from tests.kernels._util import DEVICE, close, grads, randn

# ragged: empty experts at both ends and in the middle; one expert with every token
COUNTS = {"ragged": [0, 37, 0, 5, 1, 0], "one_expert": [0, 0, 43, 0]}


@pytest.mark.parametrize("case", sorted(COUNTS))
def test_forward_backward_fp32(case):
    counts = torch.tensor(COUNTS[case], device=DEVICE)
    n_exp, n = counts.numel(), int(counts.sum())
    x = randn(n, 24, grad=True)
    w = randn(n_exp, 40, 24).transpose(1, 2).detach().requires_grad_()  # strided [E, K, M]
    y = grouped_mm(x, w, counts)
    assert type(y.grad_fn).__name__ == "_GroupedMMFnBackward"
    y_ref = grouped_mm_ref(x, w, counts)
    close(y, y_ref, what="y")
    g = randn(n, 40)
    (dx, dw), (dx_r, dw_r) = grads([y], (x, w), [g]), grads([y_ref], (x, w), [g])
    close(dx, dx_r, what="dx")
    close(dw, dw_r, what="dw")
    empty = counts == 0
    assert torch.equal(dw[empty], torch.zeros_like(dw[empty]))  # experts without rows


def test_fp16():
    counts = torch.tensor([3, 0, 20], device=DEVICE)
    x = randn(23, 32, dtype=torch.float16, grad=True)
    w = randn(3, 32, 16, dtype=torch.float16, grad=True)
    y = grouped_mm(x, w, counts)
    assert y.dtype == torch.float16
    close(y, grouped_mm_ref(x.float(), w.float(), counts).half(), atol=2e-3, rtol=2e-3)
    g = randn(23, 16, dtype=torch.float16)
    dx, dw = grads([y], (x, w), [g])
    dx_r, dw_r = grads([grouped_mm_ref(x.float(), w.float(), counts)], (x, w), [g.float()])
    close(dx.float(), dx_r.float(), atol=5e-3, rtol=5e-3, what="dx fp16")
    close(dw.float(), dw_r.float(), atol=5e-3, rtol=5e-3, what="dw fp16")


def test_no_rows():
    counts = torch.zeros(3, dtype=torch.long, device=DEVICE)
    x, w = randn(0, 8, grad=True), randn(3, 8, 4, grad=True)
    y = grouped_mm(x, w, counts)
    assert y.shape == (0, 4)
    (dw,) = grads([y], (w,), [torch.zeros(0, 4, device=DEVICE)])
    assert torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("with_weights", [True, False])
def test_experts_match_model(with_weights):
    """grouped_swiglu_experts == model.moe.experts_padded (forward and all gradients), with an
    expert that gets no token and values large enough to hit the SwiGLU clamp."""
    counts = torch.tensor([6, 0, 11, 1], device=DEVICE)
    n, dim, inter, limit = 18, 16, 24, 2.0
    x = randn(n, dim, scale=2.0, grad=True)
    w1, w3 = randn(4, inter, dim, grad=True), randn(4, inter, dim, grad=True)
    w2 = randn(4, dim, inter, grad=True)
    weights = torch.rand(n, device=DEVICE).requires_grad_() if with_weights else None
    out = grouped_swiglu_experts(x, counts, weights, w1, w3, w2, limit)
    assert type(out.grad_fn).__name__ == "_GroupedMMFnBackward"
    ref = experts_padded(x, counts, weights, w1, w3, w2, limit)
    close(out, ref, what="experts out")
    g = randn(n, dim)
    inputs = [x, w1, w3, w2] + ([weights] if with_weights else [])
    for a, r, name in zip(grads([out], inputs, [g]), grads([ref], inputs, [g]),
                          ("dx", "dw1", "dw3", "dw2", "dweights")):
        close(a, r, what=name)


def test_bad_shapes_raise():
    with pytest.raises(ValueError):
        grouped_mm(randn(4, 8), randn(2, 6, 3), torch.tensor([2, 2], device=DEVICE))
