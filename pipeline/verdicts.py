"""The report's verdicts: did a stage learn, and did it make its model worse.

**Learned** (each training stage's own metric: pre-training and SFT loss falls, GRPO's rollout
reward rises, the distillation KL to each teacher falls). The first `WINDOW` logged values are
compared with the last `WINDOW`, and the change counts only when it is larger than the run's
noise: two standard errors of the difference of the two window means, 2·σ·√(2/w), where σ, the
noise of one logged value, is estimated from the differences of consecutive values (std/√2: a
steady trend cancels, step-to-step scatter does not). A GRPO reward of 0.000 → 0.008 made of one
lucky sample is "no", not "yes".

**Worse** (greedy evaluation, the harness's held-out items): a GRPO expert against its SFT
expert on its own domain, and the distilled student against the mixed SFT it started from on
every domain. A drop in pass@1 or format validity is flagged at the top of the report when it is
larger than two standard errors of the difference of the two proportions on the items scored
(and at least one item).

**Out of band** (GRPO): a GRPO stage whose first rollout had reward variance in fewer than
`rl.grpo_task.MIN_VARIED_GROUPS` of its prompt groups started from a model it cannot improve
(GRPO learns from groups that are partly right); flagged at the top with how many of its steps
were held without an update for want of signal.
"""

from __future__ import annotations

import math
from typing import Any, Callable

WINDOW = 3


def noise(values: list[float]) -> float:
    """σ of one logged value: the standard deviation of consecutive differences over √2."""
    diffs = [b - a for a, b in zip(values, values[1:])]
    if len(diffs) < 2:
        return 0.0
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return math.sqrt(var / 2)


def change(values: list[float]) -> tuple[float, float, float] | None:
    """(first-window mean, last-window mean, the smallest change that is not noise)."""
    if len(values) < 2:
        return None
    w = max(1, min(WINDOW, len(values) // 2))
    first, last = sum(values[:w]) / w, sum(values[-w:]) / w
    return first, last, 2 * noise(values) * math.sqrt(2 / w)


def verdict(values: list[float], rises: bool) -> dict[str, Any]:
    """{"first", "last", "threshold", "learned"} of one metric's series."""
    moved = change(values)
    if moved is None:
        return {"first": None, "last": None, "threshold": None, "learned": False}
    first, last, threshold = moved
    gain = last - first if rises else first - last
    return {"first": first, "last": last, "threshold": threshold, "learned": gain > threshold}


def signals(stages: list, read_series: Callable[[Any, str], list[float]],
            metric_keys: Callable[[Any], list[str]]) -> dict[str, dict[str, Any]]:
    """Per training stage and metric: `verdict`, with the stage and metric named."""
    out = {}
    for s in stages:
        if s.kind not in ("pretrain", "sft", "grpo", "distill"):
            continue
        for key in dict.fromkeys(metric_keys(s)):
            out[f"{s.name} {key}"] = {"stage": s.name, "metric": key,
                                      **verdict(read_series(s, key), key.startswith("reward"))}
    return out


def _drop(before: dict, after: dict, key: str) -> str | None:
    p, q = before.get(key), after.get(key)
    n, m = before.get("evaluated") or 0, after.get("evaluated") or 0
    if p is None or q is None or not n or not m:
        return None
    se = math.sqrt(p * (1 - p) / n + q * (1 - q) / m)
    if p - q > max(2 * se, 1 / min(n, m)):
        return f"{key} {p:.3f} -> {q:.3f}"
    return None


def regressions(table: dict[str, dict], domains: list[str]) -> list[str]:
    """One line per (stage, domain) whose greedy pass@1 or format validity fell (docstring)."""
    pairs = [(f"grpo/{d}", f"sft/{d}", [d]) for d in domains]
    pairs.append(("distill", "sft/mixed", list(domains)))
    out = []
    for stage, start, names in pairs:
        if stage not in table or start not in table:
            continue
        for d in names:
            before = table[start]["domains"].get(d) or {}
            after = table[stage]["domains"].get(d) or {}
            drops = [x for x in (_drop(before, after, "pass@1"),
                                 _drop(before, after, "format_valid")) if x]
            if drops:
                out.append(f"{stage} made {d} worse than {start}: {'; '.join(drops)}")
    return out


def out_of_band(stages: list, read_rows: Callable[[Any], list[dict]],
                min_varied: float) -> list[str]:
    """One line per GRPO stage that started outside the band (docstring)."""
    out = []
    for s in stages:
        if s.kind != "grpo":
            continue
        rows = read_rows(s)
        first = next((r for r in rows if "rollout/zero_var_frac" in r), None)
        if first is None or 1.0 - first["rollout/zero_var_frac"] >= min_varied:
            continue
        steps = [r for r in rows if "steps_without_signal" in r]
        held = f"; {steps[-1]['steps_without_signal']} of its {steps[-1]['step']} steps were " \
            f"held without an update" if steps else ""
        out.append(f"{s.name} started outside the band GRPO learns in: "
                   f"{first['rollout/zero_var_frac']:.0%} of its first rollout's prompt groups "
                   f"had no reward variance (mean reward {first.get('reward/mean', 0.0):.3f})"
                   f"{held}")
    return out
