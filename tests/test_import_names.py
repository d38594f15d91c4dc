"""v4lab's top-level import names coexist with everything a fresh install brings.

Python keeps one module per top-level name (`sys.modules["kernels"]`), so two packages with the
same import name cannot both be used in one process: whichever is imported first wins, and the
other's users fail. That happened: v4lab's Triton package was called `kernels`, and current
transformers requires Hugging Face's `kernels` package, so loading a v4lab export with
transformers next to a v4lab model failed in either import order. The package is now
`v4kernels` (README, "Import names").

Two checks that fail when a clash comes back:
- no installed distribution other than v4lab provides one of v4lab's top-level names (a new
  release of any dependency that starts shipping, say, `data` or `pipeline` fails here, naming
  the distribution, before a user meets it);
- a child process imports transformers' hub-kernels integration and a v4lab model in both
  orders, from the repository root (where `python -m pipeline` runs, the root first on
  `sys.path`) and from another folder (the installed package), and uses both.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def own_top_level_names() -> set[str]:
    """The packages this repository installs: root folders with an `__init__.py` (the same set
    as pyproject's `packages.find`, which test_own_names_match_pyproject checks)."""
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}


def test_own_names_match_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    assert {pattern.rstrip("*") for pattern in include} == own_top_level_names()


def test_no_installed_distribution_shares_a_top_level_name():
    providers = importlib.metadata.packages_distributions()
    clashes = {name: sorted(set(providers[name]) - {"v4lab"})
               for name in own_top_level_names() if set(providers.get(name, [])) - {"v4lab"}}
    assert not clashes, (f"installed distributions provide v4lab's import names {clashes}: "
                         "in one process only one of each can be imported")


CHILD = """
import sys
order = sys.argv[1]

def use_v4lab():
    import torch
    from model.config import ModelConfig
    from model.transformer import Transformer
    import v4kernels
    x = torch.randn(2, 8)
    assert torch.equal(v4kernels.rms_norm(x, torch.ones(8), 1e-6),
                       v4kernels.rms_norm_ref(x, torch.ones(8), 1e-6))
    return Transformer, ModelConfig

def use_transformers():
    import transformers.integrations.hub_kernels  # noqa: F401  imports `kernels` when present
    try:
        import kernels
    except ImportError:
        return "absent"
    from kernels import get_kernel  # Hugging Face's, not ours
    assert callable(get_kernel), kernels.__file__
    return kernels.__file__

steps = [use_v4lab, use_transformers] if order == "v4lab-first" else [use_transformers, use_v4lab]
for step in steps:
    step()
import v4kernels, model
print("ok", v4kernels.__file__, sys.modules.get("kernels"))
"""


@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
@pytest.mark.parametrize("order", ["v4lab-first", "transformers-first"])
def test_v4lab_and_transformers_in_one_process(order, cwd, tmp_path):
    pytest.importorskip("transformers")
    where = ROOT if cwd == "root" else tmp_path
    if cwd == "elsewhere":  # the installed package, not the working tree on sys.path[0]
        probe = subprocess.run([sys.executable, "-c", "import model"], cwd=where,
                               capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip("v4lab is not installed (pip install -e .): only the root case applies")
    proc = subprocess.run([sys.executable, "-c", CHILD, order], cwd=where, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok"), proc.stdout
