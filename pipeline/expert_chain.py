"""One domain's expert: SFT, then GRPO from a learnable start, and the same compute on SFT.

    sft/<d> ── grpo/<d> ──────── eval/grpo/<d>, eval/sft/<d>
       │  ▲        └── sft_more/<d> ── eval/sft_more/<d>
       └──┘ extended while GRPO's first rollout is outside the band (`DomainSection.band`)

**A learnable start.** GRPO learns only from prompt groups whose rewards vary; an SFT expert
that solves none of its samples (or all) gives it nothing, and its held steps only spend the
budget. With `band.max_extensions > 0` the GRPO stage runs with `grpo.band=stop`: its first
rollout decides, and outside the band it exits with status 3 before any update
(`rl/grpo_task.py`). The runner then trains the SFT expert `band.extend_steps` further (the
same run resumed with a larger `steps`; its schedule is a function of the total, so the
learning rate rises part-way back and decays again over the new end) and tries GRPO again. The
last try runs with `grpo.band=warn`: GRPO then trains whatever it can and the report flags it.
The extensions made are kept in `sft_<d>/extensions.json`, so a re-run plans the same steps.

**RL against the same compute on SFT.** `sft_more/<d>` continues the SFT expert's run (a copy of
its last checkpoint: weights, optimizer state, data position) for as long as its GRPO stage
trained: K = GRPO's summed step time / the SFT's median step time (the two ran under the same
`jobs`, so they shared the CPU alike) more steps, at the SFT's final learning rate, held constant
(the tail of its schedule, not a second warm-up). A fresh optimizer instead would move every
weight by about the learning rate in its first steps: measured once, that took the calculator
expert from 0.80 to 0.44 greedy pass@1 in 19 steps. GRPO beats SFT only where it beats
this row; `sft_more/<d>/matched.json` keeps K and the times it came from.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from data.cache import atomic_write_text
from rl.grpo_task import BAND_FILE
from train.task import StageDeclined

from .stages import Stage

EXTENSIONS_FILE, MATCHED_FILE = "extensions.json", "matched.json"


@dataclass
class ExpertChain:
    sft: Stage
    grpo: Stage
    matched_sft: Stage
    rows: list  # (row, checkpoint callable, needs) for the harness


def read_band(grpo_dir: Path) -> dict[str, Any]:
    """GRPO's first-rollout band figures (`rl.grpo_task.check_band`), or {} before it ran."""
    path = Path(grpo_dir) / BAND_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def extensions_done(sft_dir: Path) -> int:
    path = Path(sft_dir) / EXTENSIONS_FILE
    return int(json.loads(path.read_text())["extensions"]) if path.is_file() else 0


def expert_chain(train: Callable, out: Path, name: str, d: dict, base_ckpt: Path,
                 sft_options: list[str], grpo_options: list[str], base_needs: tuple
                 ) -> ExpertChain:
    """The stages of domain `name` (`d`: its options, weight and sections). `train(name, kind,
    run_dir, steps, args, overrides, needs, add=True)` makes a training stage (and adds it to
    the plan); the compute-matched SFT is added by the caller, after the mixed SFT."""
    band, sft_dir, grpo_dir = d["band"], out / f"sft_{name}", out / f"grpo_{name}"
    base_steps, gave_up = d["sft"].steps, []  # gave_up: the expert solves nearly all

    def budget_left() -> bool:
        return not gave_up and extensions_done(sft_dir) < band.max_extensions

    sft = train(f"sft/{name}", "sft", sft_dir,
                base_steps + band.extend_steps * extensions_done(sft_dir),
                [f"init_from={base_ckpt}", f"sft.domains=[{name}]", *sft_options],
                d["sft"].overrides, base_needs)
    grpo = train(f"grpo/{name}", "grpo", grpo_dir, d["grpo"].steps,
                 [lambda: f"init_from={sft.checkpoint}", f"grpo.domains=[{name}]",
                  lambda: f"grpo.band={'stop' if budget_left() else 'warn'}", *grpo_options],
                 d["grpo"].overrides, (sft.name,))

    def extend(code: int) -> list[Stage] | None:
        """GRPO declined (exit 3, outside the band): train the SFT expert further and retry;
        an expert that solves nearly all its samples is not helped by more SFT: GRPO then
        runs as it is (`grpo.band=warn`)."""
        if code != StageDeclined.exit_code or not budget_left():
            return None
        if read_band(grpo_dir).get("side") == "solves nearly all":
            gave_up.append(True)
            return []
        n = extensions_done(sft_dir) + 1
        sft.steps = base_steps + band.extend_steps * n
        atomic_write_text(sft_dir / EXTENSIONS_FILE, json.dumps(
            {"extensions": n, "steps": sft.steps, "extend_steps": band.extend_steps}))
        return [sft]

    grpo.retry = extend
    matched = train(f"sft_more/{name}", "sft_more", out / f"sft_more_{name}", None,
                    [lambda: f"init_from={sft.checkpoint}", f"sft.domains=[{name}]",
                     *sft_options], d["sft"].overrides, (grpo.name,), add=False)
    match_compute(matched, sft, grpo)
    # the SFT row waits for GRPO: GRPO's band check may still extend the SFT expert
    rows = [(f"sft/{name}", lambda: sft.checkpoint, (grpo.name,)),
            (f"grpo/{name}", lambda: grpo.checkpoint, (grpo.name,)),
            (f"sft_more/{name}", lambda: matched.checkpoint, (matched.name,))]
    return ExpertChain(sft, grpo, matched, rows)


def matched_plan(grpo_dir: Path, sft_dir: Path) -> dict[str, Any]:
    """The SFT steps that take as long as the GRPO run in `grpo_dir` trained (K = its summed
    step time / the SFT run's median step time) and the SFT's last learning rate."""
    from .report import read_metrics

    grpo_rows = [r for r in read_metrics(grpo_dir) if "step_seconds" in r]
    sft_rows = [r for r in read_metrics(sft_dir) if "step_seconds" in r]
    if not grpo_rows or not sft_rows:
        raise ValueError(f"no step times in {grpo_dir}/metrics.jsonl or {sft_dir}/metrics.jsonl "
                         f"to match GRPO's compute with")
    grpo_s = sum(r["step_seconds"] for r in grpo_rows)
    sft_s = statistics.median(r["step_seconds"] for r in sft_rows)
    return {"steps": max(1, round(grpo_s / sft_s)), "grpo_seconds": grpo_s,
            "sft_step_seconds": sft_s, "lr": max(sft_rows, key=lambda r: r["step"])["lr"]}


def continue_from(checkpoint: Path, run_dir: Path) -> None:
    """Starts `run_dir` as a continuation of the run that wrote `checkpoint` (weights, optimizer
    state, data position): a copy of it in `run_dir/checkpoints/`, which `checkpoint.resume=
    auto` then resumes. A fresh optimizer would instead move every weight by about the learning
    rate in its first steps (Adam's first updates are ±lr), which is not "the same SFT, longer"."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir()):
        return  # already started (a re-run resumes it)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{checkpoint.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp)
    os.replace(tmp, root / checkpoint.name)


def match_compute(matched: Stage, sft: Stage, grpo: Stage) -> None:
    """Makes `matched` the SFT expert trained further for GRPO's training time (docstring):
    its run continues the SFT expert's (`continue_from`) for K more steps at the SFT's last
    learning rate, held constant; K and the rate are set at launch, from the runs' metrics."""
    record = matched.run_dir / MATCHED_FILE
    plan: dict[str, Any] = json.loads(record.read_text()) if record.is_file() else {}
    matched.steps = plan.get("steps")  # planned before: the same K again
    matched.output = record

    def prepare() -> None:
        extra = matched_plan(grpo.run_dir, sft.run_dir)
        plan.update(extra, extra_steps=extra["steps"], steps=sft.steps + extra["steps"],
                    continues=str(sft.checkpoint))
        matched.steps = plan["steps"]
        continue_from(sft.checkpoint, matched.run_dir)

    matched.prepare = prepare
    matched.argv += [lambda: f"optim.lr={plan.get('lr', '<set at launch>')}",
                     "schedule.warmup_steps=0",
                     "schedule.decay_steps=0"]
    matched.finish = lambda: atomic_write_text(record, json.dumps(plan, indent=1))
