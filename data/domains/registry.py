"""Domain names -> classes: `get_domain(name, **options)` and `DOMAINS`.

Built-in names map to our own generators; `rg:<task>` builds a reasoning-gym task through
`data.domains.rgym` (optional dependency, imported only then).
"""

from __future__ import annotations

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


def get_domain(name: str, **options: Any) -> Domain:
    """Build a domain by name; options go to its constructor (difficulty, thinking_mode, ...).

    Raises ValueError for an unknown name (listing the known ones) or a bad option, and
    ImportError for `rg:` names when reasoning-gym is not installed.
    """
    if isinstance(name, str) and name.startswith(RG_PREFIX):
        from data.domains.rgym import ReasoningGymDomain  # noqa: PLC0415

        task = name[len(RG_PREFIX):]
        if not task:
            raise ValueError(f"domain {name!r}: give a reasoning-gym task, e.g. 'rg:spell_backward'")
        return ReasoningGymDomain(task, **options)
    if name not in REGISTRY:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)} "
                         f"(or '{RG_PREFIX}<task>' for reasoning-gym)")
    try:
        return REGISTRY[name](**options)
    except TypeError as error:  # an unknown keyword: say which domain and what it takes
        raise ValueError(f"domain {name!r}: bad options {sorted(options)}: {error}") from None
