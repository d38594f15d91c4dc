"""The seam between the trainer core and a training stage.

Pre-training, SFT, GRPO and distillation are four `Task`s on one trainer (`train/trainer.py`).
The trainer owns the run: engine, optimizer, the step loop, gradient accumulation, checkpoints,
resume, signals, skipping of non-finite steps, expert parallelism, router-bias updates, logging.
A task owns what is particular to its stage:

- `batches(step, n_micro, phase, model)`: this step's micro-batches, asked for at the step
  boundary, so a stage can first roll out with the current weights (RL) and a stage's data
  position is its own (`state_dict` / `load_state_dict`, stored in every checkpoint).
- `count(batch)`: how many units the micro-batch's loss sums over (response tokens for SFT,
  sequences for a sequence-mean RL loss), known before the forward. The trainer sums it over
  micro-batches and ranks, so the gradient is that of (sum of all losses) / (global count), the
  same however the global batch is cut into micro-batches and ranks (torchtitan's rule; a mean
  per micro-batch would weight a micro-batch of 3 masked tokens like one of 300).
- `loss(model, batch, phase)`: a `LossOutput` holding the loss as a sum, metric sums in the same
  units (divided by the same global count for logging) and the router's expert counts.
- `evaluate(model, step, phase)`: the stage's own evaluation (held-out loss, domain pass@1,
  samples), called on every rank (under EP the forward is collective); an `EvalResult`.
- `train_mtp`: whether the stage trains the MTP block; if not, the trainer freezes it and the
  task's forward skips it (`model(..., mtp=False)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .recipe import Phase


@dataclass
class LossOutput:
    total: torch.Tensor                                  # [] the loss summed over `count` units
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [] sum, same units
    expert_counts: torch.Tensor | None = None            # [blocks, experts] tokens per expert


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)  # logged; `*loss` keys are checked
    messages: list[str] = field(default_factory=list)        # printed by rank 0


class Task(Protocol):
    """What a training stage provides to the trainer core."""

    tokenizer_file: str | None  # bundled into every checkpoint
    train_mtp: bool

    def batches(self, step: int, n_micro: int, phase: Phase, model) -> list[dict[str, Any]]:
        """This rank's `n_micro` micro-batches for optimizer step `step` (tensors on any
        device; the trainer moves them)."""

    def count(self, batch: dict[str, Any]) -> float:
        """The number of units `loss(batch).total` sums over."""

    def loss(self, model, batch: dict[str, Any], phase: Phase) -> LossOutput: ...

    def evaluate(self, model, step: int, phase: Phase) -> EvalResult: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def labelled_tokens(labels: torch.Tensor) -> float:
    """Positions with a target (labels != -100): the count of token-mean losses."""
    return float((labels != -100).sum())
