"""bench/triton_kernels.py on a CPU-only machine, and the package without triton."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "triton_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.reference_only
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit")
def test_bench_exits_with_a_message_without_gpu(capsys):
    assert _load_bench().main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_smoke_subset_runs_and_prints_tables(capsys):
    """--smoke runs a cheap section through the interpreter (the autouse fixture restores the
    env variables main() sets)."""
    assert _load_bench().main(["--smoke", "--only", "fp8", "gram"]) == 0
    out = capsys.readouterr().out
    assert "| fp8_block_quant |" in out and "| gram |" in out
    assert "FAIL" not in out and "PASS" in out


@pytest.mark.reference_only
def test_package_works_without_triton():
    """With triton unimportable, `v4kernels` imports and every dispatcher uses the reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, v4kernels\n"
        "assert not v4kernels.HAS_TRITON\n"
        "x = torch.randn(4, 8)\n"
        "y = v4kernels.rms_norm(x, torch.ones(8), 1e-6)\n"
        "assert torch.equal(y, v4kernels.rms_norm_ref(x, torch.ones(8), 1e-6))\n"
        "q, s = v4kernels.fp8_block_quant(x, 8)\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
