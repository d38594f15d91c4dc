"""Which domains a stage trains on, from its config: `<key>.domains` entries ("strings",
"arith:2", "rg:task:0.5") with per-domain `domain_options` and the stage's `thinking_mode`.

SFT, GRPO, distillation and the pipeline all name their domain mixtures this way; the errors
name the stage's key (`sft.domains`, `grpo.domain_options`, ...) and are raised at start-up,
before any data or model work.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from data.domains.registry import get_domain


def parse_domain_spec(entry: str, key: str = "sft") -> tuple[str, float]:
    """"strings" -> ("strings", 1.0); "arith:2" -> ("arith", 2.0); "rg:task:0.5" keeps the
    reasoning-gym name whole."""
    name, sep, weight = entry.rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            return entry, 1.0
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{key}.domains: {entry!r}: the weight must be a number >= 0")
        return name, value
    return entry, 1.0


def build_domains(entries: Sequence[Any], domain_options: Mapping[str, Any],
                  thinking_mode: str, key: str) -> list[tuple[Any, float]]:
    """(Domain, weight) for each `<key>.domains` entry; an unknown name, a bad option, a domain
    named twice or weights summing to 0 are a ValueError naming the key. An empty list gives
    [] (the caller says whether that is allowed)."""
    specs = [parse_domain_spec(str(e), key) for e in entries]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{key}.domains={list(entries)}: each domain at most once")
    unknown = sorted(set(domain_options) - set(names))
    if unknown:
        raise ValueError(f"{key}.domain_options: {unknown} not in {key}.domains={names}")
    built = []
    for name, weight in specs:
        options = dict(domain_options.get(name, {}))
        options.setdefault("thinking_mode", thinking_mode)
        try:
            built.append((get_domain(name, **options), weight))
        except (ValueError, ImportError) as e:
            raise ValueError(f"{key}.domains: {e}") from None
    if built and sum(w for _, w in built) <= 0:
        raise ValueError(f"{key}.domains={list(entries)}: the weights sum to 0")
    return built


def section_domains(section: Any, key: str) -> list[tuple[Any, float]]:
    """`build_domains` of a stage section with `domains`, `domain_options` and
    `thinking_mode`; at least one domain."""
    built = build_domains(section.domains, section.domain_options, section.thinking_mode, key)
    if not built:
        raise ValueError(f"{key}.domains=[]: give at least one domain")
    return built
