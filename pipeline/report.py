"""`<out_dir>/report.md`, `report.json` and the PNGs beside them, from what the stages left:
the harness's results (`eval/*.json`), each run's `metrics.jsonl`, and `stages.json`.

Whether each training stage learned (its own metric moved by more than the run's noise) and
whether a stage made its model worse on greedy evaluation (flagged at the top) are decided in
`pipeline/verdicts.py`. `report.json` carries the same numbers for programs (the tests read it).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from data.cache import atomic_write_text

from rl.grpo_task import MIN_VARIED_GROUPS

from . import verdicts
from .plots import bar_chart, curves
from .stages import Stage


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the rest is still good
            continue
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, the last value per step (a resumed run re-logs a step)."""
    last = {r["step"]: float(r[key]) for r in rows if isinstance(r.get(key), (int, float))}
    steps = sorted(last)
    return steps, [last[s] for s in steps]


TRAINING = ("pretrain", "sft", "grpo", "distill", "sft_more")  # sft_more: a baseline, no verdict


def signals(stages: list[Stage], metrics: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Per training stage: its learning metric's verdict (`pipeline.verdicts`). `metrics`:
    each training stage's rows, read once per report."""
    def keys(s: Stage) -> list[str]:
        if s.kind == "distill":
            return sorted(k for r in metrics[s.name] for k in r if k.startswith("kl/"))
        return {"pretrain": ["loss"], "sft": ["loss"], "grpo": ["reward/mean"]}[s.kind]

    return verdicts.signals(stages, lambda s, key: series(metrics[s.name], key)[1], keys)


def costs(stages: list[Stage], record: dict[str, Any],
          metrics: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    """Wall time (from stages.json), optimizer steps, tokens and the generation share."""
    out = {}
    for s in stages:
        entry = record.get(s.name, {})
        rows = metrics.get(s.name, [])
        steps = [r for r in rows if "step_seconds" in r]
        step_s = sum(r["step_seconds"] for r in steps)
        gen = sum(r.get("time/generate", 0.0) for r in steps)
        tokens = max((r.get("tokens_seen", 0) for r in steps), default=0)
        out[s.name] = {"seconds": entry.get("seconds"), "status": entry.get("status"),
                       "steps": len(steps), "tokens": tokens, "step_seconds": step_s,
                       "generate_share": gen / step_s if s.kind in ("grpo", "distill")
                       and step_s else None}
    return out


def scores(stages: list[Stage]) -> dict[str, dict[str, Any]]:
    table = {}
    for s in stages:
        if s.kind == "eval" and s.output.is_file():
            table[s.name[len("eval/"):]] = json.loads(s.output.read_text())
    return table


def write_report(cfg: Any, stages: list[Stage], out: Path, seed: int = 0) -> Path:
    """`out/report.md` and `report.json` of one seed's recipe. With several seeds, `stages`
    are that seed's (names `seed<i>/...`), and `stages.json` is the pipeline's, one level up."""
    out = Path(out)
    prefix = f"seed{seed}/" if cfg.seeds > 1 else ""
    record_path = Path(cfg.out_dir) / "stages.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
    stages = [replace(s, name=s.name[len(prefix):]) for s in stages if s.name.startswith(prefix)]
    domains = list(cfg.domains)
    table = scores(stages)
    metrics = {s.name: read_metrics(s.run_dir) for s in stages if s.kind in TRAINING}
    learned, spent = signals(stages, metrics), costs(stages, record, metrics)
    plots = write_plots(cfg, stages, metrics, table, out, domains)
    data = {"name": cfg.name, "seed": seed, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine(), "domains": domains, "scores": {
                row: r["domains"] for row, r in table.items()},
            "signals": learned, "stages": spent, "plots": [p for _, p in plots],
            "experts": experts(out, domains),
            "worse": verdicts.regressions(table, domains)
            + verdicts.out_of_band(stages, lambda s: metrics[s.name], MIN_VARIED_GROUPS)}
    atomic_write_text(out / "report.json", json.dumps(data, indent=2))
    text = render(cfg, domains, table, learned, spent, plots,
                  {**data, "record": record, "stage_objects": stages})
    atomic_write_text(out / "report.md", text)
    return out / "report.md"


def experts(out: Path, domains: list[str]) -> dict[str, dict[str, Any]]:
    """Per domain: how far its SFT expert was extended to reach GRPO's band, GRPO's band
    figures, and the compute-matched SFT's steps (`pipeline/expert_chain.py`)."""
    from .expert_chain import MATCHED_FILE, extensions_done, read_band

    info = {}
    for d in domains:
        matched = out / f"sft_more_{d}" / MATCHED_FILE
        info[d] = {"extensions": extensions_done(out / f"sft_{d}"),
                   "band": read_band(out / f"grpo_{d}"),
                   "matched": json.loads(matched.read_text()) if matched.is_file() else {}}
    return info


def write_plots(cfg: Any, stages: list[Stage], metrics: dict[str, list[dict]],
                table: dict[str, dict], out: Path, domains: list[str]) -> list[tuple[str, str]]:
    """The report's PNGs; -> (caption, file) of each one written."""
    by_kind = {k: [s for s in stages if s.kind == k] for k in TRAINING}
    plots = []
    pre = by_kind["pretrain"] or [_reused_pretrain(cfg)]
    pre = [p for p in pre if p is not None]
    if pre:
        rows = metrics.get(pre[0].name) or read_metrics(pre[0].run_dir)  # reused: not a stage
        if curves(out / "pretraining.png", "pre-training", "step",
                  {"loss": series(rows, "loss")}, right={"held-out bits/byte":
                                                         series(rows, "val_bpb")}):
            plots.append(("Pre-training: loss and held-out bits per byte", "pretraining.png"))
    sft = {s.name: series(metrics[s.name], "loss") for s in by_kind["sft"]}
    if curves(out / "sft_loss.png", "SFT loss", "step", sft):
        plots.append(("SFT loss of each expert and of the mixed-domain baseline",
                      "sft_loss.png"))
    reward = {s.name: series(metrics[s.name], "reward/mean") for s in by_kind["grpo"]}
    if curves(out / "grpo_reward.png", "GRPO rollout reward (T = 1)", "step", reward):
        plots.append(("Each expert's GRPO reward curve", "grpo_reward.png"))
    for s in by_kind["distill"]:
        rows = metrics[s.name]
        kl = {f"KL to the {d} teacher": series(rows, f"kl/{d}") for d in domains}
        if curves(out / "distill_kl.png", "on-policy distillation: reverse KL per teacher",
                  "step", kl):
            plots.append(("Distillation KL to each teacher", "distill_kl.png"))
    bars = {row: [(result["domains"].get(d) or {}).get("pass@1") or 0.0 for d in domains]
            for row, result in table.items()}
    if bar_chart(out / "scores.png", "held-out pass@1 (greedy)", domains, bars):
        plots.append(("pass@1 of every checkpoint on every domain", "scores.png"))
    return plots


def span_minutes(record: dict[str, Any]) -> float | None:
    """Minutes from the first stage's start to the last one's end (`stages.json`), or None."""
    ran = [(e["started"], e["started"] + e["seconds"]) for e in record.values()
           if e.get("status") == "ran" and "started" in e]
    if not ran:
        return None
    return (max(b for _, b in ran) - min(a for a, _ in ran)) / 60


def _reused_pretrain(cfg: Any) -> Stage | None:
    """The reused pre-training run (its checkpoint's run directory), for its curves."""
    if not cfg.pretrain.reuse:
        return None
    run_dir = Path(cfg.pretrain.reuse).parent.parent
    return Stage("pretrain", "pretrain", run_dir) if (run_dir / "metrics.jsonl").is_file() \
        else None


def machine() -> str:
    import torch

    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU only, {os.cpu_count()} cores")
    return f"{platform.node()}: {platform.machine()}, {device}; torch {torch.__version__}"


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(cfg, domains, table, learned, spent, plots, data) -> str:
    seed = f" (pre-training seed {data['seed']})" if cfg.seeds > 1 else ""
    lines = [f"# {cfg.name}{seed}: the DeepSeek-V4 recipe end to end", "",
             f"Written {data['written']} on {data['machine']}; preset `conf={cfg.conf}`, "
             f"launcher {cfg.launcher} × {cfg.nproc}, {cfg.jobs} stage(s) at a time.", ""]
    if data["worse"]:
        lines += ["**Stages that made their model worse** (greedy, held-out; a drop larger than "
                  "two standard errors) **or could not learn** (GRPO outside the band):", "",
                  *[f"- **{w}**" for w in data["worse"]], ""]
    lines += [f"## Every checkpoint on every domain ({cfg.eval.n} held-out items each, greedy)",
             ""]
    head = ["model"] + [f"{d} {c}" for d in domains for c in ("pass@1", "format", "length")]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, result in table.items():
        cells = [row]
        for d in domains:
            r = result["domains"].get(d) or {}
            cells += [_cell(r.get("pass@1")), _cell(r.get("format_valid"), 2),
                      _cell(r.get("mean_response_tokens"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "`weight_average` is the experts' element-wise mean; `sft/mixed` is SFT on "
              "all domains' data, the distillation's starting point; `sft_more/<d>` is the SFT "
              "expert trained further for as long as its GRPO stage trained.", "",
              *rl_lines(table, domains, data["experts"]), *_learning_lines(learned), "## Time and tokens", "",
              "| stage | wall time | steps | tokens | generation share of a step |",
              "|---|---|---|---|---|"]
    total = 0.0
    for name, c in spent.items():
        wall = c["seconds"]
        total += wall or 0.0
        share = "-" if c["generate_share"] is None else f"{100 * c['generate_share']:.0f} %"
        wall_text = "-" if wall is None else f"{wall / 60:.1f} min"
        lines.append(f"| {name} | {wall_text} | {c['steps'] or '-'} | "
                     f"{c['tokens'] or '-'} | {share} |")
    minutes = span_minutes(data["record"])
    span = "" if minutes is None else f"; first start to last end {minutes:.1f} min"
    lines += ["", f"Stages' wall time summed: {total / 60:.1f} min ({cfg.jobs} at a time{span})."]
    if not any(s.kind == "pretrain" for s in data["stage_objects"]):
        lines.append(f"Pre-training was reused: `{cfg.pretrain.reuse}`.")
    lines.append("")
    if plots:
        lines += ["## Plots", ""]
        for caption, name in plots:
            lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    student = table.get("distill", {}).get("examples") or {}
    if student:
        lines += ["## The student's conversations", ""]
        for d, examples in student.items():
            lines += [f"### {d}", ""]
            for e in examples:
                mark = "correct" if e["correct"] else f"wrong ({e['reason']})"
                lines += [f"- **user:** {_quote(e['prompt'])}",
                          f"  **student:** {_quote(e['completion'])}",
                          f"  reference `{e['answer']}`: {mark}", ""]
    return "\n".join(lines) + "\n"


def rl_lines(table: dict[str, dict], domains: list[str], info: dict[str, dict]) -> list[str]:
    """GRPO beside its SFT expert and beside that expert trained further for GRPO's time."""
    lines = ["## GRPO against the same compute spent on SFT", "",
             "| domain | SFT expert (extended) | sft_more: steps added | pass@1 sft / sft_more / grpo "
             "| format sft / sft_more / grpo | GRPO's own pass@1 gain |", "|---|---|---|---|---|---|"]
    for d in domains:
        got = [(table.get(f"{k}/{d}") or {}).get("domains", {}).get(d) or {}
               for k in ("sft", "sft_more", "grpo")]
        p1 = [g.get("pass@1") for g in got]
        fmt = [g.get("format_valid") for g in got]
        gain = p1[2] - p1[1] if None not in (p1[1], p1[2]) else None
        e = info.get(d, {})
        band = e.get("band") or {}
        ext = f"{e.get('extensions', 0)}×" + ("" if band.get("in_band", True) else " (out of band)")
        added = (e.get("matched") or {}).get("extra_steps")
        lines.append(f"| {d} | {ext} | {'-' if added is None else f'+{added}'} | "
                     f"{' / '.join(_cell(x) for x in p1)} | "
                     f"{' / '.join(_cell(x, 2) for x in fmt)} | {_cell(gain)} |")
    return lines + ["", "GRPO's own gain is its greedy pass@1 minus the compute-matched SFT's: "
                    "what RL adds beyond more of the same SFT.", ""]


def _learning_lines(learned: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Did each stage learn?", "",
             "| stage | metric | first | last | noise threshold | learned |",
             "|---|---|---|---|---|---|"]
    for sig in learned.values():
        lines.append(f"| {sig['stage']} | {sig['metric']} | {_cell(sig['first'])} | "
                     f"{_cell(sig['last'])} | {_cell(sig['threshold'])} | "
                     f"{'yes' if sig['learned'] else '**no**'} |")
    return lines + ["", f"First and last are means of {verdicts.WINDOW} logged values; a stage "
                    f"learned when its metric moved the right way by more than the noise "
                    f"threshold (two standard errors of that difference, from the run's "
                    f"step-to-step scatter).", ""]


def _quote(text: str) -> str:
    text = " ".join(str(text).split())
    return f"`{text.replace('`', chr(39))}`"
