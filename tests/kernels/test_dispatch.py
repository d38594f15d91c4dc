"""The dispatch rule, lazy kernel decoration, env scoping, and the leaf-package rule."""

import ast
import os
from pathlib import Path

import pytest
import torch

import v4kernels
from v4kernels import dispatch, rms_norm
from tests.kernels._util import DEVICE

KERNELS_DIR = Path(v4kernels.__file__).parent


def _path_of(y):
    return "kernel" if type(y.grad_fn).__name__ == "_RMSNormFnBackward" else "reference"


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU dispatch rule")
def test_cpu_tensors_use_the_reference_unless_forced(monkeypatch):
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.ones(8)
    for mode, expected in (("auto", "reference"), ("ref", "reference"), ("triton", "kernel")):
        monkeypatch.setenv("V4_KERNELS", mode)
        assert _path_of(rms_norm(x, w, 1e-6)) == expected, mode
    monkeypatch.delenv("V4_KERNELS")
    assert _path_of(rms_norm(x, w, 1e-6)) == "reference"  # default is auto


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU dispatch rule")
def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        rms_norm(torch.randn(2, 8), None, 1e-6)


def test_unknown_mode_raises_and_none_is_ignored(monkeypatch):
    monkeypatch.setenv("V4_KERNELS", "fast")
    with pytest.raises(ValueError, match="V4_KERNELS"):
        dispatch.use_triton(torch.zeros(1))
    monkeypatch.setenv("V4_KERNELS", "ref")
    assert dispatch.use_triton(torch.zeros(1), None) is False


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-mode check")
def test_lazy_kernel_is_decorated_for_the_current_mode():
    from triton.runtime.interpreter import InterpretedFunction

    from v4kernels.rms_norm import _rms_fwd_kernel as kernel
    assert isinstance(kernel, dispatch.LazyKernel)
    assert isinstance(kernel.resolve(), InterpretedFunction)


@pytest.mark.reference_only
def test_env_is_not_leaked_outside_kernel_tests():
    """Reference-only tests get no monkeypatched env: the conftest's temporary
    TRITON_INTERPRET around triton's import must be gone (unless the caller set it)."""
    from tests.kernels.conftest import CALLER_TRITON_INTERPRET
    assert os.environ.get("TRITON_INTERPRET") == CALLER_TRITON_INTERPRET


@pytest.mark.reference_only
def test_kernels_is_a_leaf_package():
    """v4kernels/ must not import model/ or optim/ (the model imports kernels)."""
    for path in KERNELS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("model", "optim", "train"), (path.name, name)
