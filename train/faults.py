"""Fault injection for the launcher's own tests: the failure paths (non-finite steps, a rank
dying) must be exercised end to end, in real processes, not mocked.

    V4LAB_FAULT_NAN_STEPS=2,3   the loss of optimizer steps 2 and 3 becomes NaN
    V4LAB_FAULT_RAISE_RANK=1    rank 1 raises at its first step
"""

from __future__ import annotations

import os


def nan_at(step: int) -> bool:
    spec = os.environ.get("V4LAB_FAULT_NAN_STEPS", "")
    return str(step) in {s.strip() for s in spec.split(",") if s.strip()}


def maybe_raise(rank: int) -> None:
    if os.environ.get("V4LAB_FAULT_RAISE_RANK") == str(rank):
        raise RuntimeError(f"injected fault on rank {rank} (V4LAB_FAULT_RAISE_RANK)")
