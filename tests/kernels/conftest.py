"""Kernel tests: the Triton kernels against their references.

Without a GPU they run on CPU tensors through the Triton interpreter; with one, on CUDA tensors
with the compiled kernels (same tests, same tolerances).

Scoping: `TRITON_INTERPRET=1` (CPU only) and `V4_KERNELS=triton` are set per test through
monkeypatch and undone afterwards, so nothing outside tests/kernels sees them. That works however
and whenever triton was imported (e.g. by an earlier test directory importing the model),
because `v4kernels.dispatch` decorates our kernels at launch time and lends the interpreter
interpreted twins of triton's standard library during an interpreted launch.
"""

import os

import pytest
import torch

from v4kernels.dispatch import HAS_TRITON

ON_GPU = torch.cuda.is_available()
CALLER_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET")


def pytest_configure(config):
    config.addinivalue_line("markers",
                            "reference_only: checks references only; runs without triton")


@pytest.fixture(autouse=True)
def triton_kernels(request, monkeypatch):
    torch.manual_seed(0)
    if request.node.get_closest_marker("reference_only") is not None:
        return
    if not HAS_TRITON:
        pytest.skip("triton is not importable: the dispatchers use the references")
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("V4_KERNELS", "triton")
