"""`<out_dir>/report.md` over pre-training seeds (`python -m pipeline seeds=3`).

Each seed's own report stays in `seed_<i>/report.md`; this one puts them together: every
checkpoint's greedy pass@1 and format validity as mean ± standard deviation over the seeds
(the sample standard deviation, n - 1), each stage's gain the same way with every seed's value
beside it, and the issue's goals checked per seed. One seed's figure is an anecdote; the spread
says how much of a gain is the base it started from.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from data.cache import atomic_write_text

from .report import span_minutes

# (gain, model, baseline): "model minus baseline" on the model's domains
GAINS = [("GRPO over its SFT expert", "grpo/{d}", "sft/{d}"),
         ("GRPO over the same compute on SFT", "grpo/{d}", "sft_more/{d}"),
         ("student over the mixed SFT", "distill", "sft/mixed"),
         ("student over the weight average", "distill", "weight_average")]


def spread(values: list[float]) -> str:
    """"mean ± sd" (sd over seeds, n - 1), or the one value."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def metric(report: dict, row: str, domain: str, key: str) -> float | None:
    value = ((report["scores"].get(row) or {}).get(domain) or {}).get(key)
    return None if value is None else float(value)


def goals(report: dict, domains: list[str], minutes: float) -> dict[str, bool]:
    """The issue's benchmark goals on one seed (missing figures count as not met)."""
    def at_least(row, base, d, key):
        a, b = metric(report, row, d, key), metric(report, base, d, key)
        return a is not None and b is not None and a >= b

    def above(d):
        s = metric(report, "distill", d, "pass@1")
        return s is not None and all(
            (b := metric(report, base, d, "pass@1")) is not None and s > b
            for base in ("sft/mixed", "weight_average"))

    calc = metric(report, "grpo/calculator", "calculator", "pass@1")
    return {"≤ 30 min": minutes <= 30.0,
            "GRPO ≥ SFT (pass@1, format)": all(
                at_least(f"grpo/{d}", f"sft/{d}", d, k) for d in domains
                for k in ("pass@1", "format_valid")),
            "student > both baselines": all(above(d) for d in domains),
            "calculator pass@1 ≥ 0.2": calc is not None and calc >= 0.2}


def write_seeds_report(cfg: Any, seed_dirs: list[Path]) -> Path:
    out = Path(cfg.out_dir)
    reports = [json.loads((d / "report.json").read_text()) for d in seed_dirs
               if (d / "report.json").is_file()]
    domains = list(cfg.domains)
    record_path = out / "stages.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    minutes = seed_minutes(record, len(seed_dirs))
    lines = [f"# {cfg.name}: the recipe on {len(reports)} pre-training seeds", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; each seed's own report: "
             + ", ".join(f"[{d.name}]({d.name}/report.md)" for d in seed_dirs) + ".", "",
             "Mean ± standard deviation over the seeds (greedy, held-out items).", ""]
    lines += score_lines(reports, domains) + gain_lines(reports, domains)
    names = list(goals({"scores": {}}, domains, 0.0))
    lines += ["## Goals, per seed", "", "| seed | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    for r in reports:
        met = goals(r, domains, minutes)
        lines.append(f"| {r.get('seed', '?')} | " + " | ".join(
            "yes" if ok else "**no**" for ok in met.values()) + " |")
    lines += ["", f"Time per seed: {minutes:.1f} min (the run's first start to last end, "
              f"divided by the {len(seed_dirs)} seeds that shared it, {cfg.jobs} stages at a "
              f"time).", ""]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "report.json", json.dumps(
        {"seeds": [r.get("seed") for r in reports], "minutes_per_seed": minutes,
         "goals": [goals(r, domains, minutes) for r in reports]}, indent=2))
    return out / "report.md"


def seed_minutes(record: dict, seeds: int) -> float:
    """The run's first start to last end, shared out over the seeds that ran in it."""
    return (span_minutes(record) or 0.0) / max(seeds, 1)


def score_lines(reports: list[dict], domains: list[str]) -> list[str]:
    rows = list(dict.fromkeys(row for r in reports for row in r["scores"]))
    head = ["model"] + [f"{d} {k}" for d in domains for k in ("pass@1", "format")]
    lines = ["## Every checkpoint", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in rows:
        cells = [row]
        for d in domains:
            for key in ("pass@1", "format_valid"):
                cells.append(spread([v for r in reports
                                     if (v := metric(r, row, d, key)) is not None]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def gain_lines(reports: list[dict], domains: list[str]) -> list[str]:
    lines = ["## What each stage added", "",
             "| gain | domain | metric | mean ± sd | per seed |", "|---|---|---|---|---|"]
    for label, model, base in GAINS:
        for d in domains:
            for key in ("pass@1", "format_valid"):
                per = [metric(r, model.format(d=d), d, key) for r in reports]
                ref = [metric(r, base.format(d=d), d, key) for r in reports]
                diffs = [a - b for a, b in zip(per, ref) if a is not None and b is not None]
                if diffs:
                    lines.append(f"| {label} | {d} | {key} | {spread(diffs)} | "
                                 + ", ".join(f"{x:+.2f}" for x in diffs) + " |")
    return lines + [""]
