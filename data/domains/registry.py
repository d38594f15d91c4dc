"""Domain names -> classes: `get_domain(name, **options)` and `DOMAINS`.

Built-in names map to our own generators; `rg:<task>` builds a reasoning-gym task through
`data.domains.rgym` (optional dependency, imported only then); `data:<source>` reads your own
problems from a file or dataset (`data.domains.dataset`); `vf:<taskset-id>` runs an
environment written for the `verifiers` package (`data.domains.environment`).

Your own domains, without editing this package: put `Domain` subclasses in a module that
calls `register_domain(cls)` at import, and name it in the environment variable
`V4LAB_DOMAINS` (comma-separated modules, importable from `PYTHONPATH`). Every entry point and
every process of a launcher then knows them, because the variable travels with the
environment: `V4LAB_DOMAINS=my_domains python -m rl.grpo grpo.domains=[my_task]`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from data.domains.arith import ArithDomain
from data.domains.base import Domain
from data.domains.calculator import CalculatorDomain
from data.domains.countdown import CountdownDomain
from data.domains.strings import StringsDomain

REGISTRY: dict[str, type[Domain]] = {
    cls.name: cls for cls in (StringsDomain, ArithDomain, CountdownDomain, CalculatorDomain)
}
DOMAINS: tuple[str, ...] = tuple(REGISTRY)
RG_PREFIX = "rg:"
DATA_PREFIX = "data:"  # a dataset of your own problems: data/domains/dataset.py
VF_PREFIX = "vf:"  # an environment written for `verifiers`: data/domains/environment.py
PLUGINS_ENV = "V4LAB_DOMAINS"
_loaded_plugins: set[str] = set()


def register_domain(cls: type[Domain]) -> type[Domain]:
    """Adds a Domain subclass under its `name` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Domain)) or not getattr(cls, "name", ""):
        raise ValueError(f"register_domain: {cls!r} is not a named Domain subclass")
    REGISTRY[cls.name] = cls
    return cls


def load_plugins() -> None:
    """Imports the modules named in $V4LAB_DOMAINS once each (they register their domains)."""
    for module in (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",")):
        if module and module not in _loaded_plugins:
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ImportError(f"{PLUGINS_ENV}={os.environ[PLUGINS_ENV]!r}: cannot import "
                                  f"{module!r}: {error}") from error
            _loaded_plugins.add(module)


def get_domain(name: str, **options: Any) -> Domain:
    """Build a domain by name; options go to its constructor (difficulty, thinking_mode, ...).

    Raises ValueError for an unknown name (listing the known ones) or a bad option, and
    ImportError for `rg:` names when reasoning-gym is not installed.
    """
    if isinstance(name, str) and name.startswith(DATA_PREFIX):
        from data.domains.dataset import DatasetDomain, inline_options  # noqa: PLC0415

        source, inline = inline_options(name[len(DATA_PREFIX):])
        try:
            return DatasetDomain(source, **{**inline, **options})
        except TypeError as error:
            raise ValueError(f"domain {name!r}: bad options: {error}") from None
    if isinstance(name, str) and name.startswith(VF_PREFIX):
        from data.domains.dataset import inline_options  # noqa: PLC0415
        from data.domains.environment import VerifiersDomain  # noqa: PLC0415

        taskset, inline = inline_options(name[len(VF_PREFIX):])
        if not taskset:
            raise ValueError(f"domain {name!r}: give a verifiers taskset id, e.g. 'vf:my_env'")
        try:
            return VerifiersDomain(taskset, **{**inline, **options})
        except TypeError as error:
            raise ValueError(f"domain {name!r}: bad options: {error}") from None
    if isinstance(name, str) and name.startswith(RG_PREFIX):
        from data.domains.rgym import ReasoningGymDomain  # noqa: PLC0415

        task = name[len(RG_PREFIX):]
        if not task:
            raise ValueError(f"domain {name!r}: give a reasoning-gym task, e.g. 'rg:spell_backward'")
        return ReasoningGymDomain(task, **options)
    load_plugins()
    if name not in REGISTRY:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(REGISTRY)} "
                         f"(or '{RG_PREFIX}<task>' for reasoning-gym, or your own through "
                         f"${PLUGINS_ENV})")
    try:
        return REGISTRY[name](**options)
    except TypeError as error:  # an unknown keyword: say which domain and what it takes
        raise ValueError(f"domain {name!r}: bad options {sorted(options)}: {error}") from None
