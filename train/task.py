"""The seam between the trainer core and a training stage.

Pre-training, SFT, GRPO and distillation are four `Task` subclasses on one trainer
(`train/trainer.py`). The trainer owns the run: engine, optimizer, the step loop, gradient
accumulation, checkpoints, resume, signals, skipping of non-finite steps, expert parallelism,
router-bias updates, logging. A task owns what is particular to its stage. It must give:

- `batches(step, n_micro, model)`: this step's micro-batches, asked for at the step boundary,
  so a stage can first roll out with the current weights (RL) and a stage's data position is
  its own (`state_dict` / `load_state_dict`, stored in every checkpoint).
- `count(batch)`: how many units the micro-batch's loss sums over (response tokens for SFT,
  sequences for a sequence-mean RL loss), known before the forward. The trainer sums it over
  micro-batches and ranks, so the gradient is that of (sum of all losses) / (global count), the
  same however the global batch is cut into micro-batches and ranks (torchtitan's rule; a mean
  per micro-batch would weight a micro-batch of 3 masked tokens like one of 300).
- `loss(model, batch)`: a `LossOutput` holding the loss as a sum, metric sums in the same units
  (divided by the same global count for logging) and the router's expert counts.
- `evaluate(model, step)`: the stage's own evaluation (held-out loss, domain pass@1, samples),
  called on every rank (under EP the forward is collective); an `EvalResult`.

And may override (the defaults in `Task` are what a stage without the feature wants):
- `make_schedule(lr_schedule)`: what changes with the step (`train.schedule.StageSchedule`:
  one phase and a fixed batch; pre-training and SFT use `train.recipe.RecipeSchedule`), and
  `enter_phase(phase)`, told each new phase (kept as `self.phase`);
- `train_mtp` (True): whether the stage trains the MTP block (if not, it is frozen and the
  forward skips it); `update_router_bias` (True): False keeps the routers' balancing biases
  fixed (GRPO with replayed routes); `context_parallel` (False): the stage runs under
  `parallel.cp_size > 1`;
- `tokens(batch)`: the tokens a micro-batch holds, for throughput and `tokens_seen`;
- `step_metrics(step_seconds)`: extra metrics logged with the step (GRPO's rollout rewards,
  lengths and time split); `derive_metrics(metrics)`: metrics computed from the logged ones
  (distillation's KL per domain, a ratio of two sums);
- `attach_frozen(ep_groups)`: called once the policy is built, to load the stage's frozen
  models sharded over the same expert-parallel groups (GRPO's reference, the teachers);
- `carries_signal(batch)`: whether a micro-batch can teach anything beyond having units to
  count (GRPO: a non-zero advantage); a step where no micro-batch on any rank does, or whose
  global count is 0, is held: no update, no optimizer-state change, no schedule advance,
  counted as `steps_without_signal` (`Trainer.signal_in`);
- `stop_check`: the trainer sets it to a callable that says a stop signal arrived, so long batch
  work (a rollout) can end early: the task restores its state to before the step and raises
  `StopRequested`, every rank together, and the trainer checkpoints the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from model.loss import LossWeights, token_sums

from .config import RecipeSection
from .dist import all_reduce_sum
from .schedule import Phase, StageSchedule


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


class Task:
    """A training stage on the trainer core (module doc): subclasses give `batches`, `count`,
    `loss` and `evaluate`, and override the other members where their stage differs."""

    tokenizer_file: str | None = None  # bundled into every checkpoint
    train_mtp = True
    update_router_bias = True
    context_parallel = False
    phase: Phase | None = None

    def stop_check(self) -> bool:  # replaced by the trainer's
        return False

    def make_schedule(self, lr_schedule) -> StageSchedule:
        return StageSchedule(self.cfg)

    def enter_phase(self, phase: Phase) -> None:
        self.phase = phase

    def batches(self, step: int, n_micro: int, model) -> list[dict[str, Any]]:
        """This rank's `n_micro` micro-batches for optimizer step `step` (tensors on any
        device; the trainer moves them)."""
        raise NotImplementedError

    def count(self, batch: dict[str, Any]) -> float:
        """The number of units `loss(batch).total` sums over."""
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Any]) -> LossOutput:
        raise NotImplementedError

    def evaluate(self, model, step: int) -> EvalResult:
        return EvalResult()

    def tokens(self, batch: dict[str, Any]) -> int:
        return batch["input_ids"].numel()

    def carries_signal(self, batch: dict[str, Any]) -> bool:
        return True

    def step_metrics(self, step_seconds: float) -> dict[str, float]:
        return {}

    def derive_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return {}

    def attach_frozen(self, ep_groups) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


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
