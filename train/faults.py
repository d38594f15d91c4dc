"""Fault injection for the launcher's own tests: the failure paths (non-finite steps, a rank
dying, a signal mid-run, a full disk) must be exercised end to end, in real processes, not
mocked.

    V4LAB_FAULT_NAN_STEPS=2,3    the loss of optimizer steps 2 and 3 becomes NaN
    V4LAB_FAULT_RAISE_RANK=1     rank 1 raises at its first step
    V4LAB_FAULT_SIGTERM_STEP=3   each rank sends itself SIGTERM right after optimizer step 3 (a
                                 deterministic stand-in for a scheduler's signal)
    V4LAB_FAULT_DISK_FULL=1      every checkpoint save and the loss-curve plot fail with ENOSPC
"""

from __future__ import annotations

import errno
import os
import signal


def _steps(name: str) -> set[str]:
    return {s.strip() for s in os.environ.get(name, "").split(",") if s.strip()}


def nan_at(step: int) -> bool:
    return str(step) in _steps("V4LAB_FAULT_NAN_STEPS")


def maybe_raise(rank: int) -> None:
    if os.environ.get("V4LAB_FAULT_RAISE_RANK") == str(rank):
        raise RuntimeError(f"injected fault on rank {rank} (V4LAB_FAULT_RAISE_RANK)")


def maybe_sigterm(step: int) -> None:
    """Delivers a real SIGTERM to this process after `step`, through the installed handler."""
    if str(step) in _steps("V4LAB_FAULT_SIGTERM_STEP"):
        os.kill(os.getpid(), signal.SIGTERM)


def disk_full(path: os.PathLike | str) -> None:
    """Raises what a write to `path` raises on a full filesystem."""
    if os.environ.get("V4LAB_FAULT_DISK_FULL", "") not in ("", "0"):
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (V4LAB_FAULT_DISK_FULL)",
                      str(path))
