"""GRPO steps per minute with rollouts through the engine against the batch-synchronous
`generate` path (`grpo.rollout_engine=false`), from one expert at the recipe's calculator
settings (`conf/pipeline.yaml`: 8 prompts x 8 samples, turns of up to 64 tokens, one tool turn).

    python bench/grpo_engine.py --init runs/recipe/sft_calculator/checkpoints/step_00000060 \
        [--steps 7] [--seeds 0 1] [--compile] [-- extra overrides]

Runs `python -m rl.grpo` twice per seed (engine on, then off), each `--steps` steps from the
same checkpoint, and reads their `metrics.jsonl`: steps per minute over the steps after the
first (start-up and the first rollout's warm-up excluded; with 2 updates per rollout every
other step rolls out), the generation share of a step
(`time/generate` over `step_seconds`) and the rollout reward mean. Prints one line per run and
the ratio of mean steps per minute. `--compile`: the engine runs with its decode step compiled
(`grpo.rollout_compile=true`); the compile falls in the first rollout, which is not counted
(its seconds are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = ["grpo.domains=[calculator]", "+grpo.domain_options.calculator.difficulty=1",
          "+grpo.domain_options.calculator.schema=brief", "grpo.max_new_tokens=64",
          "grpo.prompts_per_step=8", "grpo.group_size=8", "grpo.updates=2",
          "data.micro_batch=16", "data.seq_len=256", "optim.name=adamw", "optim.lr=3e-5",
          "grpo.adv_norm=mean_std", "grpo.dynamic_sampling=true", "grpo.max_refill_rounds=1",
          "grpo.eval_n=0", "logging.eval_every=0", "checkpoint.every=0",
          "logging.progress=false", "logging.wandb.mode=disabled"]


def run(init: str, engine: bool, seed: int, steps: int, extra: list[str], folder: str,
        compile: bool = False):
    run_dir = os.path.join(folder, f"{'engine' if engine else 'generate'}_{seed}")
    cmd = [sys.executable, "-m", "rl.grpo", f"init_from={init}", f"run_dir={run_dir}",
           f"steps={steps}", f"seed={seed}", f"grpo.rollout_engine={str(engine).lower()}",
           f"grpo.rollout_compile={str(engine and compile).lower()}", *RECIPE, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-2000:] + out.stderr[-2000:])
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = [r for r in rows if "step_seconds" in r]
    first, rows = rows[0]["step_seconds"], rows[1:]  # after the first step
    seconds = sum(r["step_seconds"] for r in rows)
    return {"steps_per_min": 60 * len(rows) / seconds, "first_step_s": first,
            "generate_share": sum(r.get("time/generate", 0.0) for r in rows) / seconds,
            "reward": statistics.mean(r["reward/mean"] for r in rows if "reward/mean" in r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", required=True)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--compile", action="store_true", help="grpo.rollout_compile=true")
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    results = {True: [], False: []}
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            for engine in (True, False):
                r = run(args.init, engine, seed, args.steps, args.extra, folder, args.compile)
                results[engine].append(r)
                print(f"seed {seed} {'engine  ' if engine else 'generate'}: "
                      f"{r['steps_per_min']:.2f} steps/min, generation "
                      f"{100 * r['generate_share']:.0f}% of a step, reward mean "
                      f"{r['reward']:.3f}, first step {r['first_step_s']:.0f} s", flush=True)
    ours = statistics.mean(r["steps_per_min"] for r in results[True])
    base = statistics.mean(r["steps_per_min"] for r in results[False])
    print(f"GRPO steps/min (calculator, recipe settings, {len(args.seeds)} seed(s)): ours "
          f"{ours:.2f} (engine{', compiled' if args.compile else ''}), baseline {base:.2f} (generate), ratio {ours / base:.2f}")


if __name__ == "__main__":
    main()
