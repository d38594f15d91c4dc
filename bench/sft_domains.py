"""Domain-expert SFT from the default pre-training checkpoint: one expert per domain, each
measured by the evaluation harness on held-out (test-split) items.

    python bench/sft_domains.py --base runs/tiny/checkpoints/step_00000100 \
        [--domains strings arith countdown calculator] [--steps 300] [--n 200]

Runs the real launcher (`train/sft.py`) once per domain, then `python -m train.evaluate` on the
base checkpoint and on each expert, and prints one line per domain:

    sft/<domain>: pass@1 base …, expert …; format-valid base …, expert …; minutes …

The goal (issue #14): format-valid >= 0.95 and a held-out pass@1 between 0.2 and 0.8 (a band
where GRPO has signal), a few CPU minutes per domain. Extra Hydra overrides after `--` go to
every SFT run (e.g. `-- sft.domain_options.arith.difficulty=2`).
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

# domains whose default prompt needs a smaller tool schema to fit the tiny context
OPTIONS = {"calculator": ["+sft.domain_options.calculator.schema=brief"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="pre-training checkpoint (step directory)")
    ap.add_argument("--domains", nargs="+", default=["strings", "arith", "countdown",
                                                     "calculator"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n", type=int, default=200, help="held-out items per domain")
    ap.add_argument("--runs", default="runs/bench_sft")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every SFT run")
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    for domain in args.domains:
        options = [*OPTIONS.get(domain, []), *args.extra]
        run_dir = runs / domain
        t0 = time.perf_counter()
        last = run_dir / "checkpoints" / f"step_{args.steps:08d}"
        if not last.is_dir():  # a finished expert is reused (and an interrupted one resumed)
            subprocess.run([sys.executable, "train/sft.py", f"init_from={args.base}",
                            f"sft.domains=[{domain}]", f"steps={args.steps}",
                            f"run_dir={run_dir}", "logging.progress=false",
                            "logging.wandb.mode=disabled", "sft.eval_n=0", "checkpoint.every=50",
                            *options], cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
        minutes = (time.perf_counter() - t0) / 60
        base = evaluate(args.base, domain, args.n, runs / f"{domain}_base.json", options,
                          "sft")
        expert = evaluate(str(last), domain, args.n, runs / f"{domain}_expert.json", options,
                          "sft")
        print(f"sft/{domain}: pass@1 base {base['pass@1']:.3f}, expert {expert['pass@1']:.3f}; "
              f"format-valid base {base['format_valid']:.3f}, expert "
              f"{expert['format_valid']:.3f}; {args.steps} steps in {minutes:.1f} min",
              flush=True)


if __name__ == "__main__":
    main()
