"""Muon vs AdamW on the tiny preset: same tokens, same learning rate (Muon's update RMS is
matched to AdamW's, so AdamW's LR carries over), held-out loss along the way.

    python bench/muon_vs_adamw.py [--steps 200] [--eval-every 20]

Runs the real launcher (`train/pretrain.py`) twice on the default corpus, then reports the
fraction of tokens Muon needed to reach AdamW's final held-out loss (goal ≤ 0.75).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(optim: str, steps: int, eval_every: int, run_dir: Path, extra: list[str]) -> list:
    cmd = [sys.executable, "train/pretrain.py", f"optim.name={optim}", f"steps={steps}",
           f"logging.eval_every={eval_every}", "logging.eval_batches=8", "checkpoint.every=0",
           "checkpoint.resume=none", "logging.progress=false", "logging.wandb.mode=disabled",
           "logging.sample_tokens=8", f"run_dir={run_dir}", *extra]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for both runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        curves = {o: train(o, args.steps, args.eval_every, Path(tmp) / o, args.extra)
                  for o in ("adamw", "muon")}
    for o, curve in curves.items():
        print(f"{o}: " + ", ".join(f"{s}:{v:.3f}" for s, v in curve))
    target = curves["adamw"][-1][1]
    reached = next((s for s, v in curves["muon"] if v <= target), None)
    final = curves["muon"][-1][1]
    if reached is None:
        print(f"muon_vs_adamw final held-out loss: ours {final:.4f}, baseline {target:.4f}, "
              f"ratio {final / target:.3f} (Muon did not reach AdamW's final loss)")
    else:
        print(f"muon_vs_adamw tokens to AdamW's final loss {target:.4f}: ours {reached} steps, "
              f"baseline {args.steps} steps, ratio {reached / args.steps:.3f} (goal <= 0.75)")
        print(f"muon_vs_adamw final held-out loss: ours {final:.4f}, baseline {target:.4f}, "
              f"ratio {final / target:.3f}")


if __name__ == "__main__":
    main()
