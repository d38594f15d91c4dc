"""Multi-teacher on-policy distillation from GRPO experts, next to two baselines, each measured
by the evaluation harness on held-out (test-split) items of every teacher's domain.

    python bench/distill_domains.py --student runs/sft_mix/checkpoints/step_00000300 \
        --teacher strings=runs/grpo_strings/checkpoints/step_00000060 \
        --teacher arith=runs/grpo_arith/checkpoints/step_00000060 \
        [--steps 60] [--n 200] [--runs runs/bench_distill] [-- hydra overrides]

Rows, per domain: the teacher (its own domain), the distilled student, and the baselines

- `mixed SFT`: the student's starting checkpoint, SFT on the mixed domains' data (give the
  mixed-SFT run as `--student`, so that distillation starts where that baseline ends);
- `weight average`: the element-wise mean of the teachers' weights (one model, no training).

The goal (issue #16): the student reaches >= 90 % of each teacher's held-out pass@1 on the
teacher's own domain within 15 minutes of a 2-core CPU. Prints one line per domain,

    distill/<domain>: teacher …, student … (…% of the teacher), mixed SFT …, weight average …

and a line with the distillation's wall time. Domain options go as
`+distill.domain_options.<domain>.<key>=<value>` after `--` (the harness gets them too).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ENV, REPO, evaluate  # noqa: E402

sys.path.insert(0, str(REPO))
from pipeline.average import weight_average  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", required=True, help="starting checkpoint (the mixed SFT run)")
    ap.add_argument("--teacher", action="append", required=True, metavar="DOMAIN=CKPT")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--n", type=int, default=200, help="held-out items per domain")
    ap.add_argument("--runs", default="runs/bench_distill")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for the distillation run")
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    teachers = dict(spec.partition("=")[::2] for spec in args.teacher)
    spec = "{" + ", ".join(f"{d}: {p}" for d, p in teachers.items()) + "}"
    run_dir = runs / "student"
    last = run_dir / "checkpoints" / f"step_{args.steps:08d}"
    t0 = time.perf_counter()
    if not last.is_dir():
        subprocess.run([sys.executable, "-m", "distill.onpolicy", f"init_from={args.student}",
                        f"teachers={spec}", f"steps={args.steps}", f"run_dir={run_dir}",
                        "logging.progress=false", "logging.wandb.mode=disabled",
                        "checkpoint.every=20", *args.extra], cwd=REPO, env=ENV, check=True,
                       stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - t0) / 60
    average = weight_average(list(teachers.values()), runs / "weight_average")
    for domain, teacher in teachers.items():
        def score(ckpt, tag):
            return evaluate(str(ckpt), domain, args.n, runs / f"{domain}_{tag}.json",
                            args.extra, "distill")["pass@1"]

        t, s = score(teacher, "teacher"), score(last, "student")
        sft, avg = score(args.student, "mixed_sft"), score(average, "weight_average")
        share = s / t if t else float("nan")
        print(f"distill/{domain}: teacher {t:.3f}, student {s:.3f} ({100 * share:.0f}% of the "
              f"teacher), mixed SFT {sft:.3f}, weight average {avg:.3f}", flush=True)
    print(f"distill: {args.steps} steps in {minutes:.1f} min; curve "
          f"{run_dir / 'loss_curve.png'}", flush=True)


if __name__ == "__main__":
    main()
