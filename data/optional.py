"""Optional dependencies (the extras of pyproject.toml), imported only where a feature needs
them, with one message naming the extra when one is missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, feature: str, extra: str, package: str) -> ModuleType:
    """`module`, or ImportError: "<feature> need(s) <package>, which is not installed: pip
    install 'v4lab[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{feature} need {package}, which is not installed: "
                          f"pip install 'v4lab[{extra}]'  ({package})") from error
