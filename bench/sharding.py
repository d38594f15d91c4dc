"""Benchmark: step time and peak memory per rank for each `parallel.zero_stage` (0 to 3), on 2
and 4 CPU processes (gloo), as ratios against stage 0 in the same invocation.

    python bench/sharding.py                         # bf16, dim 256, EP 1, 2 and 4 processes
    python bench/sharding.py --worlds 2 --ep 2 --dtype fp32

Each rank runs the trainer's step wiring (`tests/parallel/harness.py`: DeepSpeed engine at stage
0, MuonAdamW, gradient accumulation of 2 micro-batches, ZeRO 1/2/3 accumulation into owners,
stage 3's per-block weight gathers, EP clipping). Memory is counted from tensors, as CUDA's
`max_memory_allocated` would on a GPU: the bytes of every live tensor storage when the measured
steps begin (weights, optimizer state, DeepSpeed's fp32 copies) plus the peak of what the steps
allocate above that (`SectionPeak`: gradients, fp32 buffers, activations, Newton-Schulz and
reduce workspaces). Allocator rounding
and Python's own memory are not included. `plan` is `train.plan.make_plan`'s total for the same
layout (with its workspace and activation estimates).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from tests.helpers.distributed import run_distributed
    from tests.parallel import harness
    from train.plan import make_plan

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    a = vars(p.parse_args())
    cfg = harness.sized_config(a["dim"])
    mib = 2 ** 20
    for world in a["worlds"]:
        res = {}
        for stage in (0, 1, 2, 3):
            ranks = run_distributed(harness.measure_step_memory, world, a["ep"], stage,
                                    a["dim"], a["seq"], a["steps"], a["dtype"] == "bf16",
                                    timeout=900)
            plan = make_plan(cfg, world, a["ep"], harness.MICRO, a["seq"],
                             2 * harness.MICRO * world, a["dtype"] == "bf16", "off",
                             zero_stage=stage)
            res[stage] = (max(r["peak"] for r in ranks), max(r["step_s"] for r in ranks),
                          plan.total)
            peak, step_s, planned = res[stage]
            print(f"world {world} EP {a['ep']} {a['dtype']} zero_stage {stage}: step "
                  f"{step_s * 1e3:.0f} ms, peak {peak / mib:.1f} MiB per rank (max over ranks; "
                  f"state at step start {max(r['base'] for r in ranks) / mib:.1f} MiB), plan "
                  f"{planned / mib:.1f} MiB, measured / plan {peak / planned:.2f}", flush=True)
        for stage in (1, 2, 3):
            print(f"world {world} zero_stage {stage} vs 0: peak memory ratio "
                  f"{res[stage][0] / res[0][0]:.2f}, step time ratio "
                  f"{res[stage][1] / res[0][1]:.2f}")


if __name__ == "__main__":
    main()
