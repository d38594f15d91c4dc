"""Every import the project makes is provided by something `pyproject.toml` declares.

Users and CI install only what `pyproject.toml` declares, so an import that works on the machine
where the code was written (because a package was once installed by hand, or arrives as another
package's dependency) can crash on a fresh one: the main job once died at its very end for want of
matplotlib. This test reads every Python file of the project with `ast` (nothing is executed),
collects the top-level module of each absolute import (also inside functions, and
`importlib.import_module("name")` with a literal name), and requires each to be

- in the standard library (`sys.stdlib_module_names`), or
- one of the project's own top-level modules, or a sibling file or package of the importing script (a
  script run as `python bench/x.py` has its own folder first on `sys.path`), or
- provided by a distribution named in `[project] dependencies` (for library code) or, for tests,
  in the `test` extra too. Import names are mapped to distributions with
  `importlib.metadata.packages_distributions()`.

A transitive dependency does not count: if we import `psutil` ourselves we declare it, because the
package that happens to bring it today may drop it tomorrow. A module provided only by an optional
extra (other than `test`) is allowed in library code only when imported lazily, inside a function,
so that a user without the extra never fails at import time.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ["model", "optim", "v4kernels", "data", "encoding", "train", "rl", "distill", "pipeline",
           "serve", "bench", "generate.py"]
OWN = {"model", "optim", "v4kernels", "data", "encoding", "train", "rl", "distill", "pipeline",
       "serve", "bench", "generate", "tests", "conftest"}


def normalise(name: str) -> str:
    """PEP 503 normalisation, so `hydra_core`, `Hydra-Core` and `hydra-core` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert match, f"pyproject.toml: cannot read the requirement {spec!r}"
    return normalise(match.group(1))


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(runtime dependencies, {extra: its dependencies}) from pyproject.toml."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python >= 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {requirement_name(s) for s in project.get("dependencies", [])}
    extras = {name: {requirement_name(s) for s in specs}
              for name, specs in project.get("optional-dependencies", {}).items()}
    return runtime, extras


def python_files(entries: list[str]) -> list[Path]:
    files: list[Path] = []
    for entry in entries:
        path = ROOT / entry
        files.extend([path] if path.is_file() else sorted(path.rglob("*.py")))
    return files


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, imported at module level) for each absolute import in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], child.lineno, not in_function)
                             for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], child.lineno, not in_function))
            elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                  and child.func.attr == "import_module" and child.args
                  and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
                found.append((child.args[0].value.split(".")[0], child.lineno, not in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def undeclared(files: list[Path], allowed: set[str], lazy_only: set[str]) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    problems = []
    for path in files:
        for module, line, top_level in imports(path):
            if module in sys.stdlib_module_names or module in OWN or module == "__future__":
                continue
            if (path.parent / f"{module}.py").is_file() or \
                    (path.parent / module / "__init__.py").is_file():  # a script's own folder
                continue
            # An optional extra need not be installed where the check runs: an import name with
            # no installed provider is then matched by its own normalised name (reasoning_gym
            # -> reasoning-gym).
            installed = {normalise(d) for d in providers.get(module, [])}
            dists = installed or {normalise(module)}
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            where = f"{shown}:{line}: import {module}"
            if dists & allowed:
                continue
            if dists & lazy_only:
                if top_level:
                    problems.append(f"{where} (from optional extra {sorted(dists & lazy_only)}: "
                                    "import it inside the function that needs it)")
                continue
            problems.append(f"{where} (provided by {sorted(installed) or 'nothing installed'}; "
                            "not declared in pyproject.toml)")
    return problems


def test_library_imports_are_declared():
    runtime, extras = declared()
    optional = set().union(*(deps for name, deps in extras.items() if name != "test")) - runtime
    problems = undeclared(python_files(LIBRARY), runtime, optional)
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_test_imports_are_in_the_test_extra():
    runtime, extras = declared()
    assert "test" in extras, "pyproject.toml: [project.optional-dependencies] has no `test` extra"
    problems = undeclared(python_files(["tests", "conftest.py"]), runtime | extras["test"], set())
    assert not problems, "undeclared imports in tests:\n" + "\n".join(problems)


def test_the_check_catches_an_undeclared_import(tmp_path):
    """The checker itself can fail: a file importing matplotlib with matplotlib undeclared."""
    probe = tmp_path / "probe.py"
    probe.write_text("def plot():\n    import matplotlib.pyplot\n")
    problems = undeclared([probe], {"torch"}, set())
    assert len(problems) == 1 and "import matplotlib" in problems[0]
    assert not undeclared([probe], {"torch"}, {"matplotlib"})  # lazy import of an extra: fine
    probe.write_text("import matplotlib\n")
    assert undeclared([probe], {"torch"}, {"matplotlib"})  # top-level import of an extra: not
    # An extra that is not installed here, imported lazily: fine (matched by its import name).
    probe.write_text("def load():\n    import not_installed_extra_xyz\n")
    assert not undeclared([probe], {"torch"}, {"not-installed-extra-xyz"})
    assert undeclared([probe], {"torch"}, set())
