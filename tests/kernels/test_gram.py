"""Symmetric Gram kernel (Newton-Schulz's X·Xᵀ) vs reference."""

import pytest
import torch

from v4kernels import gram, gram_ref
from tests.kernels._util import close, grads, randn


@pytest.mark.parametrize("shape", [(40, 70), (2, 3, 16, 33), (1, 5)])
def test_forward_fp32_exactly_symmetric(shape):
    """m = 40 spans two 32-row tiles (3 of 4 tiles computed, one mirrored)."""
    x = randn(*shape)
    a = gram(x)
    assert a.shape == (*shape[:-1], shape[-2])
    close(a, gram_ref(x), what="gram")
    assert torch.equal(a, a.mT)


def test_backward_fp32():
    x = randn(2, 20, 36, grad=True)
    a = gram(x)
    assert type(a.grad_fn).__name__ == "_GramFnBackward"
    g = randn(2, 20, 20)
    close(grads([a], [x], [g])[0], grads([gram_ref(x)], [x], [g])[0])


def test_fp16_and_strided_input():
    x = randn(24, 48, dtype=torch.float16)
    close(gram(x).float(), gram_ref(x.float()), atol=5e-2, rtol=2e-3, what="fp16")
    xt = randn(50, 30).mT  # a transposed view: the short side first, as Newton-Schulz does
    close(gram(xt), gram_ref(xt))


def test_rejects_vectors():
    with pytest.raises(ValueError):
        gram(randn(5))
