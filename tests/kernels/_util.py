"""Shared helpers of the kernel tests."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, scale=1.0, dtype=torch.float32, grad=False):
    """Seeded on the CPU generator, then moved, so CPU and GPU runs see the same numbers."""
    t = (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)
    return t.requires_grad_() if grad else t


def close(actual, expected, atol=1e-5, rtol=1e-5, what=""):
    """assert_close with the issue's fp32 tolerance (1e-5 / 1e-5) by default, dtype-strict."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def grads(outputs, inputs, seed_grads):
    """Gradients of Σ <output, seed> w.r.t. inputs (None for inputs that get none)."""
    return torch.autograd.grad(list(outputs), list(inputs), list(seed_grads), allow_unused=True)
