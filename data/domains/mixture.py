"""SFT conversations from several domains with weights, in the JSONL format `data.sft` reads.

    records = mixture([("strings", 1.0), ("arith", 2.0, {"difficulty": 3})], n=3000, seed=0)
    write_sft_jsonl(records, "sft_mix.jsonl")
    SFTConfig(sources=["sft_mix.jsonl"], tokenizer=...)      # then data.sft.build_sft_data

Each record is `Item.to_sft_record()`: `{"messages", "thinking_mode", "domain"}` (tools ride on
the system message, which `encoding.tokenize_conversation` renders), so `SFTStats.domains`
counts conversations per domain. Counts per domain are the weights' shares of `n` by largest
remainder (exact, deterministic); the records are then interleaved by a seeded shuffle.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from data.cache import atomic_write_text
from data.domains.base import Domain, draw_rng
from data.domains.registry import get_domain

Spec = tuple  # (name or Domain, weight) or (name, weight, options)


def _resolve(entry: Spec, i: int) -> tuple[Domain, float]:
    if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
        raise ValueError(f"mixture[{i}]={entry!r}: expected (name, weight) or "
                         "(name, weight, options)")
    what, weight = entry[0], entry[1]
    options = dict(entry[2]) if len(entry) == 3 else {}
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"mixture[{i}]: weight={weight!r}: expected a number >= 0")
    if isinstance(what, Domain):
        if options:
            raise ValueError(f"mixture[{i}]: options given for an already built domain")
        domain = what
    else:
        domain = get_domain(what, **options)
    if not getattr(domain, "references", True):
        raise ValueError(f"mixture[{i}]: {domain.name!r} has no reference answers for SFT")
    return domain, float(weight)


def allocate(weights: Sequence[float], n: int) -> list[int]:
    """Split n into integer counts proportional to weights (largest remainder, ties by order)."""
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"mixture weights {list(weights)}: need a positive total")
    shares = [w * n / total for w in weights]
    counts = [int(s) for s in shares]
    order = sorted(range(len(weights)), key=lambda k: (-(shares[k] - counts[k]), k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


def mixture(spec: Sequence[Spec], n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`n` SFT records drawn from the domains of `spec` in proportion to the weights.

    Every domain is built (and its options checked) before any item is generated.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"mixture: n={n!r}: expected an int >= 0")
    if not spec:
        raise ValueError("mixture: give at least one (domain, weight)")
    resolved = [_resolve(entry, i) for i, entry in enumerate(spec)]
    counts = allocate([w for _, w in resolved], n)
    records = []
    for (domain, _), count in zip(resolved, counts):
        records.extend(item.to_sft_record() for item in domain.generate(split, count, seed))
    draw_rng("mixture", seed, split, n).shuffle(records)
    return records


def write_sft_jsonl(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Write records one JSON object per line, atomically (a crash leaves no partial file)."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
