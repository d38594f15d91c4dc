"""GRPO from SFT experts: one `python -m rl.grpo` run per domain, each measured by the evaluation
harness on held-out (test-split) items before and after.

    python bench/grpo_domains.py --expert strings=runs/bench_sft/strings/checkpoints/step_00000200 \
        [--expert arith=...] [--steps 40] [--n 200] [--minutes 15] [-- hydra overrides]

Prints one line per domain:

    grpo/<domain>: pass@1 expert …, GRPO …, gain …; format-valid …; steps … in … min

and leaves each run's `reward_curve.png` (rollout mean reward and held-out pass@1 per
evaluation) in its run directory. With `--matched-sft` it also continues the expert's SFT run (its
checkpoint, optimizer state and all) for as long as GRPO trained (`pipeline.expert_chain
.matched_plan`: GRPO's summed step time over the expert's median SFT step time, at the expert's
last learning rate, with the expert run's own sequence length and batch) and prints GRPO's gain over that run too, so a gain is RL's own:

    grpo/<domain>: same compute on SFT (K steps) pass@1 …; GRPO's own gain … The goal (issue #15): +0.15 absolute held-out pass@1 on at
least two domains within 15 minutes of a 2-core CPU each. Extra Hydra overrides after `--` go to
every GRPO run; domain options use `+grpo.domain_options.<domain>.<key>=<value>` and are passed
to the harness as well.
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

OPTIONS = {"calculator": ["+grpo.domain_options.calculator.schema=brief"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--expert", action="append", required=True, metavar="DOMAIN=CKPT",
                    help="an SFT expert checkpoint (step directory) per domain")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--n", type=int, default=200, help="held-out items per domain")
    ap.add_argument("--runs", default="runs/bench_grpo")
    ap.add_argument("--matched-sft", action="store_true",
                    help="also train each expert further on SFT for GRPO's time (a baseline)")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every GRPO run")
    args = ap.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    for spec in args.expert:
        domain, _, expert = spec.partition("=")
        options = [*OPTIONS.get(domain, []), *args.extra]
        run_dir = runs / domain
        last = run_dir / "checkpoints" / f"step_{args.steps:08d}"
        t0 = time.perf_counter()
        if not last.is_dir():
            subprocess.run([sys.executable, "-m", "rl.grpo", f"init_from={expert}",
                            f"grpo.domains=[{domain}]", f"steps={args.steps}",
                            f"run_dir={run_dir}", "logging.progress=false",
                            "logging.wandb.mode=disabled", "checkpoint.every=10",
                            *options], cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
        minutes = (time.perf_counter() - t0) / 60
        before = evaluate(expert, domain, args.n, runs / f"{domain}_expert.json", options,
                          "grpo")
        after = evaluate(str(last), domain, args.n, runs / f"{domain}_grpo.json", options,
                          "grpo")
        print(f"grpo/{domain}: pass@1 expert {before['pass@1']:.3f}, GRPO {after['pass@1']:.3f}, "
              f"gain {after['pass@1'] - before['pass@1']:+.3f}; format-valid "
              f"{before['format_valid']:.3f} -> {after['format_valid']:.3f}; {args.steps} steps "
              f"in {minutes:.1f} min; curve {run_dir / 'reward_curve.png'}", flush=True)
        if args.matched_sft:
            more = matched_sft(Path(expert), run_dir, runs / f"{domain}_sft_more", domain,
                               options)
            ckpt = more["run_dir"] / "checkpoints" / f"step_{more['steps']:08d}"
            same = evaluate(str(ckpt), domain, args.n, runs / f"{domain}_sft_more.json",
                            options, "grpo")
            print(f"grpo/{domain}: same compute on SFT ({more['steps']} steps in all) pass@1 "
                  f"{same['pass@1']:.3f}, format-valid {same['format_valid']:.3f}; GRPO's own "
                  f"gain {after['pass@1'] - same['pass@1']:+.3f}", flush=True)


def matched_sft(expert: Path, grpo_dir: Path, run_dir: Path, domain: str,
                options: list[str]) -> dict:
    """The expert's SFT run continued (its checkpoint copied, optimizer state and all) for
    GRPO's training time (docstring)."""
    from omegaconf import OmegaConf

    from pipeline.expert_chain import continue_from, matched_plan

    sft_dir = expert.parent.parent
    plan = matched_plan(grpo_dir, sft_dir)
    steps = int(expert.name.split("_")[1]) + plan["steps"]
    c = OmegaConf.load(sft_dir / "config.yaml")
    sft_options = [o.replace("+grpo.domain_options.", "+sft.domain_options.") for o in options
                   if o.startswith("+grpo.domain_options.")]
    if not (run_dir / "checkpoints" / f"step_{steps:08d}").is_dir():
        continue_from(expert, run_dir)
        subprocess.run([sys.executable, "-m", "train.sft", f"init_from={expert}",
                        f"sft.domains=[{domain}]", f"steps={steps}", f"run_dir={run_dir}",
                        f"data.seq_len={c.data.seq_len}", f"data.micro_batch={c.data.micro_batch}",
                        f"batch.global_batch={c.batch.global_batch}", f"optim.lr={plan['lr']}",
                        "schedule.warmup_steps=0", "schedule.decay_steps=0", "sft.eval_n=0",
                        "logging.progress=false", "logging.wandb.mode=disabled", *sft_options],
                       cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return {**plan, "steps": steps, "run_dir": run_dir}

if __name__ == "__main__":
    main()
