"""What the post-training benchmarks share: the evaluation harness run on one checkpoint.

`options` are the Hydra overrides given to a stage (`+<section>.domain_options.<domain>.<key>=v`);
the domain options among them go to `python -m train.evaluate` as `options.<domain>.<key>=v`, so
the expert is measured on the domain it was trained on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}


def evaluate(ckpt: str, domain: str, n: int, out: Path, options: list[str],
             section: str) -> dict:
    """Greedy pass@1 etc. of `ckpt` on `n` held-out items of `domain` (the harness's row)."""
    prefix = f"+{section}.domain_options."
    mine = f"{prefix}{domain}."  # a multi-domain stage's options: only this domain's
    opts = [f"options.{o[len(prefix):]}" for o in options if o.startswith(mine)]
    subprocess.run([sys.executable, "-m", "train.evaluate", f"ckpt={ckpt}",
                    f"domains=[{domain}]", f"n={n}", "k=0", "max_new_tokens=64", "device=cpu",
                    f"out={out}", *opts], cwd=REPO, env=ENV, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["domains"][domain]
