"""Learning-rate schedules (as multipliers of the peak LR) and the batch-size ramp.

DeepSeek-V4 (report; v4_architecture.md §10.3): linear warm-up over 2000 steps, the peak held for
most of training, then a cosine decay "near the end" to 0.1× the peak (Flash 2.7e-4 → 2.7e-5).
The length of that final decay is not published, so it is a parameter (`decay_steps`).

One dataclass covers the variants:
- ``cosine`` / ``linear`` with ``decay_steps=None``: the classic schedules, decaying over all the
  steps after warm-up;
- the V4 schedule: ``decay="cosine"`` with a ``decay_steps`` window at the end (`v4_schedule`);
- WSD (warmup-stable-decay): a short final window, usually the ``1 − sqrt`` shape to ~0
  (`wsd_schedule`).

Use with `torch.optim.lr_scheduler.LambdaLR` (`make_scheduler`): the multiplier applies to every
param group's initial lr, so Muon and AdamW groups move together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DECAY_SHAPES = ("cosine", "linear", "sqrt")


@dataclass(frozen=True)
class LRSchedule:
    """Peak-LR multiplier at an optimizer step: warm-up → constant → decay → floor."""

    total_steps: int
    warmup_steps: int = 2000
    decay_steps: int | None = None  # final decay window; None → all steps after warm-up
    min_ratio: float = 0.1          # floor, as a fraction of the peak
    decay: str = "cosine"           # "cosine" | "linear" | "sqrt" (1 − sqrt(t))

    def __post_init__(self) -> None:
        if self.decay not in DECAY_SHAPES:
            raise ValueError(f"LRSchedule.decay={self.decay!r}: choose one of {DECAY_SHAPES}")
        if self.total_steps <= 0 or self.warmup_steps < 0:
            raise ValueError(f"LRSchedule: total_steps={self.total_steps} must be > 0 and "
                             f"warmup_steps={self.warmup_steps} >= 0")
        if self.decay_start < self.warmup_steps:
            raise ValueError(f"LRSchedule: the decay window ({self.decay_steps} steps) overlaps "
                             f"the warm-up ({self.warmup_steps} steps) within {self.total_steps}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"LRSchedule.min_ratio={self.min_ratio} must be in [0, 1]")

    @property
    def decay_start(self) -> int:
        if self.decay_steps is None:
            return self.warmup_steps
        return self.total_steps - self.decay_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # (step + 1): the first optimizer step already gets a non-zero lr
            return (step + 1) / self.warmup_steps
        span = self.total_steps - self.decay_start
        if step < self.decay_start:
            return 1.0
        t = 1.0 if span <= 0 else min(1.0, (step - self.decay_start) / span)
        if self.decay == "cosine":
            frac = 0.5 * (1.0 + math.cos(math.pi * t))
        elif self.decay == "linear":
            frac = 1.0 - t
        else:
            frac = 1.0 - math.sqrt(t)
        return self.min_ratio + (1.0 - self.min_ratio) * frac


def v4_schedule(total_steps: int, decay_steps: int, warmup_steps: int = 2000,
                min_ratio: float = 0.1) -> LRSchedule:
    """DeepSeek-V4: warm-up, hold the peak, cosine to 0.1× over the last `decay_steps`."""
    return LRSchedule(total_steps, warmup_steps, decay_steps, min_ratio, "cosine")


def cosine_schedule(total_steps: int, warmup_steps: int = 2000,
                    min_ratio: float = 0.1) -> LRSchedule:
    return LRSchedule(total_steps, warmup_steps, None, min_ratio, "cosine")


def linear_schedule(total_steps: int, warmup_steps: int = 2000,
                    min_ratio: float = 0.1) -> LRSchedule:
    return LRSchedule(total_steps, warmup_steps, None, min_ratio, "linear")


def wsd_schedule(total_steps: int, warmup_steps: int = 2000, decay_fraction: float = 0.2,
                 min_ratio: float = 0.0, decay: str = "sqrt") -> LRSchedule:
    """Warmup-stable-decay: the last `decay_fraction` of training decays (default 1 − sqrt)."""
    return LRSchedule(total_steps, warmup_steps, round(total_steps * decay_fraction),
                      min_ratio, decay)


def lr_lambda(schedule: LRSchedule):
    """The callable `LambdaLR(lr_lambda=...)` expects (the schedule itself is one)."""
    return schedule


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule,
                   last_epoch: int = -1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule), last_epoch=last_epoch)


def batch_size_ramp(consumed: int, start: int, end: int, ramp: int, multiple_of: int = 1) -> int:
    """Global batch size after `consumed` units of training (DeepSeek-V3/V4-style ramp).

    Grows linearly from `start` to `end` over the first `ramp` units, then stays at `end`. The
    unit is the caller's: V3 ramps 3072 → 15360 sequences over the first 469B *tokens*, so pass
    tokens consumed. Rounded down to a multiple of `multiple_of` (micro-batch × data-parallel
    size, so every step splits evenly), never below `start` or above `end`.
    """
    if not 0 < start <= end or ramp < 0 or multiple_of < 1:
        raise ValueError(f"batch_size_ramp: need 0 < start={start} <= end={end}, ramp={ramp} >= 0 "
                         f"and multiple_of={multiple_of} >= 1")
    if start % multiple_of or end % multiple_of:
        raise ValueError(f"batch_size_ramp: start={start} and end={end} must be multiples of "
                         f"multiple_of={multiple_of}")
    if ramp == 0 or consumed >= ramp:
        return end
    size = start + (end - start) * max(consumed, 0) / ramp
    return max(start, min(end, int(size) // multiple_of * multiple_of))
