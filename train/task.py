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
- optional `update_router_bias` (default True): False keeps the routers' balancing biases fixed
  (GRPO with replayed routes); optional `step_metrics(step_seconds)`: extra metrics logged with
  the step (GRPO's rollout rewards, lengths and time split); optional `derive_metrics(metrics)`:
  metrics computed from the logged ones (distillation's KL per domain, a ratio of two sums);
  optional `attach_frozen(ep_groups)`: called once the policy is built, to load the stage's
  frozen models sharded over the same expert-parallel groups (GRPO's reference, the teachers);
  optional `carries_signal(batch)`: whether a micro-batch can teach anything beyond having units
  to count (GRPO: a non-zero advantage); a step where no micro-batch on any rank does, or whose
  global count is 0, is held: no update, no optimizer-state change, no schedule advance, counted
  as `steps_without_signal` (`Trainer.signal_in`);
  optional `stop_check`: the trainer sets it to a callable that says a stop signal arrived, so
  long batch work (a rollout) can end early: the task restores its state to before the step
  and raises `StopRequested`, every rank together, and the trainer checkpoints the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from model.loss import LossWeights, token_sums

from .config import RecipeSection
from .dist import all_reduce_sum
from .recipe import Phase


class StopRequested(Exception):
    """Raised by `Task.batches` when a stop signal cut this step's batch work short (on every
    rank); the task's state is as before the step."""


class StageDeclined(Exception):
    """Raised by a task, on every rank together, when the stage should not spend its budget
    (GRPO from a model outside the band it learns in, `grpo.band=stop`): the run ends before any
    update, without a checkpoint, with exit status `exit_code` and `str(self)` as its one line."""

    exit_code = 3


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


def lm_objective(model, batch: dict[str, Any], phase: Phase, recipe: RecipeSection,
                 train_mtp: bool = True) -> LossOutput:
    """The V4 language-model objective on a packed batch (pre-training and SFT), as a sum over
    the batch's target tokens (`model.loss.token_sums`): CE + λ_mtp·MTP CE + balance + indexer
    KL, the auxiliary terms averaged per target token like the CE. Under context parallelism
    each rank returns its share of the whole rows' sum."""
    out = model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"],
                mtp=train_mtp)
    weights = LossWeights(mtp=phase.mtp_weight if train_mtp else 0.0,
                          balance=recipe.balance_weight, indexer=recipe.indexer_weight)
    terms = token_sums(out, batch["labels"], batch["doc_ids"], weights, context_parallel_of(model))
    metrics = {"lm_loss": terms.lm, "balance_loss": terms.balance, "indexer_loss": terms.indexer}
    if train_mtp:
        metrics["mtp_loss"] = terms.mtp
    return LossOutput(terms.total, metrics, out.expert_counts)


def context_parallel_of(model):
    """The model's `ContextParallel` (None without), through a DeepSpeed engine too."""
    return getattr(getattr(model, "module", model), "context_parallel", None)


def local_labels(model, labels: torch.Tensor) -> torch.Tensor:
    """`labels` of whole rows → the tokens this rank computes (all of them without CP)."""
    cp = context_parallel_of(model)
    return labels if cp is None else cp.take(labels)


@torch.no_grad()
def held_out_loss(model, loader, device: torch.device) -> float:
    """Token-mean CE of the main head over a finite loader of packed batches, all ranks."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"],
                    mtp=False)
        labels = local_labels(model, batch["labels"])
        ce = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1),
                                               labels.flatten(), ignore_index=-100,
                                               reduction="sum")
        totals += torch.stack([ce.double(), (labels != -100).sum().double()])
    all_reduce_sum(totals)
    return float(totals[0] / totals[1].clamp_min(1)) if totals[1] > 0 else math.nan
