"""Verifiable domains: seeded generators + exact verifiers, rendered as DeepSeek-V4 chats.

Used by SFT (`mixture` -> JSONL for `data.sft`), GRPO and distillation (prompts, `verify`, the
calculator's tool executor) and evaluation. The contract is in `data.domains.base`.

    from data.domains import get_domain, safe_verify
    d = get_domain("arith", difficulty=3)
    item = d.sample("test", 0)
    safe_verify(d, item, item.reference_completion()).reward   # 1.0

CLI: `python -m data.domains list`, `python -m data.domains show strings --n 3`.
"""

from data.domains.base import (SPLITS, AnswerDomain, Domain, Item, Score, ScoreSummary,
                               safe_verify, summarize)
from data.domains.mixture import mixture, write_sft_jsonl
from data.domains.registry import DOMAINS, get_domain

__all__ = [
    "DOMAINS",
    "SPLITS",
    "AnswerDomain",
    "Domain",
    "Item",
    "Score",
    "ScoreSummary",
    "get_domain",
    "mixture",
    "safe_verify",
    "summarize",
    "write_sft_jsonl",
]
