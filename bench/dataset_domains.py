"""Your own data through SFT then GRPO: a math word-problem set and a code set (small functions
with unit tests), both written by this script as JSONL and read back through the dataset domain
(`data:<file>`, `verifier=math` and `verifier=code` with the sandbox), held-out pass@1 measured
by `python -m train.evaluate` before and after each stage.

    python bench/dataset_domains.py --base runs/tiny/checkpoints/step_00000100 \
        [--kind math code] [--sft-steps 150] [--grpo-steps 20] [--n 100] [--runs runs/bench_data]
        [--grpo-extra optim.lr=1e-4 ...]

Math: two-step word problems ("Ann has 7 pens and buys 5 more; she gives away 3. How many
pens does she have now?"), the answer an integer, the solution a one-line worked step ending
in `\\boxed{N}`. Code: 60+ one-line functions (`add_7(x)`, `mul_3(x)`, `last_k(s)`, ...),
three asserts each; the solution a fenced Python block. Prints one line per stage per set, with
the minutes each stage took on this machine; one run, one seed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import ENV, REPO  # noqa: E402

NAMES = ["Ann", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Ivy"]
THINGS = ["pens", "apples", "cards", "coins", "books", "shells"]


def math_rows(count: int, seed: int = 0) -> list[dict]:
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < count:
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(2, 20), rng.randint(1, 9)
        c = rng.randint(1, a + b - 1)
        question = (f"{who} has {a} {what} and gets {b} more, then gives away {c}. How many "
                    f"{what} does {who} have now?")
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": str(a + b - c),
                     "solution": f"{a} + {b} - {c} = \\boxed{{{a + b - c}}}"})
    return rows


def code_rows() -> list[dict]:
    """One-line functions with three asserts each (64 of them)."""
    rows = []
    for k in range(1, 17):
        for name, expr, test in (
                (f"add_{k}", f"x + {k}", lambda x, k=k: x + k),
                (f"sub_{k}", f"x - {k}", lambda x, k=k: x - k),
                (f"mul_{k}", f"x * {k}", lambda x, k=k: x * k),
                (f"mod_{k + 1}", f"x % {k + 1}", lambda x, k=k: x % (k + 1))):
            rows.append({"prompt": f"Write a Python function {name}(x) that returns "
                                   f"{expr}.",
                         "tests": [f"assert {name}({x}) == {test(x)}" for x in (3, 10, 25)],
                         "solution": f"```python\ndef {name}(x):\n    return {expr}\n```"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(ckpt: str, domain: str, n: int, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "train.evaluate", f"ckpt={ckpt}",
                    f"domains=['{domain}']", f"n={n}", "k=0", "max_new_tokens=64",
                    "device=cpu", f"out={out}"], cwd=REPO, env=ENV, check=True,
                   stdout=subprocess.DEVNULL)
    return next(iter(json.loads(out.read_text())["domains"].values()))


def stage(cmd: list[str], run_dir: Path, steps: int) -> tuple[str, float]:
    last = run_dir / "checkpoints" / f"step_{steps:08d}"
    t0 = time.perf_counter()
    if not last.is_dir():
        subprocess.run([sys.executable, *cmd, f"run_dir={run_dir}", f"steps={steps}",
                        "logging.progress=false", "logging.wandb.mode=disabled",
                        f"checkpoint.every={steps}"], cwd=REPO, env=ENV, check=True,
                       stdout=subprocess.DEVNULL)
    return str(last), (time.perf_counter() - t0) / 60


def run_set(kind: str, domain: str, args, runs: Path) -> None:
    n = args.n
    base = evaluate(args.base, domain, n, runs / f"{kind}_base.json")
    print(f"{kind}: base pass@1 {base['pass@1']:.3f} (format-valid {base['format_valid']:.3f}, "
          f"{base['evaluated']} held-out items)", flush=True)
    sft, minutes = stage(["train/sft.py", f"init_from={args.base}", f"sft.domains=['{domain}']",
                          "sft.eval_n=0", "data.seq_len=256", "batch.global_batch=8",
                          "optim.lr=2e-3", "schedule.warmup_steps=10",
                          f"schedule.decay_steps={args.sft_steps}"],
                         runs / f"{kind}_sft", args.sft_steps)
    after = evaluate(sft, domain, n, runs / f"{kind}_sft.json")
    print(f"{kind}: SFT pass@1 {after['pass@1']:.3f} (format-valid {after['format_valid']:.3f}); "
          f"{args.sft_steps} steps in {minutes:.1f} min", flush=True)
    grpo, minutes = stage(["-m", "rl.grpo", f"init_from={sft}", f"grpo.domains=['{domain}']",
                           "grpo.max_new_tokens=48", "grpo.prompts_per_step=8",
                           "grpo.group_size=8", "grpo.updates=2", "data.micro_batch=16",
                           "data.seq_len=256", "optim.name=adamw", "optim.lr=3e-5",
                           "grpo.adv_norm=mean_std", "grpo.eval_n=0", "logging.eval_every=0",
                           *args.grpo_extra],
                          runs / f"{kind}_grpo", args.grpo_steps)
    final = evaluate(grpo, domain, n, runs / f"{kind}_grpo.json")
    print(f"{kind}: GRPO pass@1 {final['pass@1']:.3f} (format-valid "
          f"{final['format_valid']:.3f}); {args.grpo_steps} steps in {minutes:.1f} min",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--kind", nargs="+", default=["math", "code"], choices=["math", "code"])
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--grpo-steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--runs", default="runs/bench_data")
    ap.add_argument("--grpo-extra", nargs="*", default=[], help="more GRPO overrides")
    args = ap.parse_args()
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    sets = {"math": f"data:{write_jsonl(runs / 'math.jsonl', math_rows(2000))}?verifier=math",
            "code": f"data:{write_jsonl(runs / 'code.jsonl', code_rows())}?verifier=code"
                    f"&test_fraction=0.25&cpu_seconds=2&wall_seconds=5"}
    for kind in args.kind:
        run_set(kind, sets[kind], args, runs)


if __name__ == "__main__":
    main()
