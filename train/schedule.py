"""A stage's schedule: what changes with the optimizer step, supplied by the stage's task
(`Task.make_schedule`), so the trainer core knows optimisation, not stages.

Per step the trainer asks it for
- `phase(step)`: the attention mode, the sequence length and the MTP loss weight
  (`Phase`), handed to the task (`Task.enter_phase`) whenever it changes;
- `enter(model, phase, train_mtp)`: the model side of a new phase (CSA mode, which parameters
  train);
- `sequences(tokens_seen, phase, per_step)`: sequences in the step, a multiple of `per_step`
  (micro-batch x data-parallel size);
- `layout_error(phase, step, world)`: why this run's layout cannot run the phase (None: it can);
- `replay_tokens(steps, per_step)`: the tokens the first `steps` steps consumed (checkpoints
  written before `tokens_seen` was saved).

`StageSchedule` is the post-training default (GRPO, distillation): one phase for the whole run
(the model as pre-training leaves it: sparse CSA with the indexer's KL, `data.seq_len`), every
parameter but a frozen MTP block trains, and `batch.global_batch` samples every step.
`train.recipe.RecipeSchedule` (pre-training, SFT) adds V4's phases, the batch-size ramp and
sequence-length stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Phase:
    csa_mode: str
    indexer_loss: bool
    indexer_only: bool
    mtp_weight: float
    seq_len: int


class StageSchedule:
    def __init__(self, cfg: Any):
        self.cfg = cfg

    def phase(self, step: int) -> Phase:
        return Phase("sparse", True, False, 0.0, self.cfg.data.seq_len)

    def trainable(self, name: str, phase: Phase, train_mtp: bool) -> bool:
        """Whether parameter `name` trains in `phase` (a stage that does not train the MTP block
        freezes it: no gradient is reduced for it and the optimizer neither decays nor moves
        it)."""
        return train_mtp or not name.startswith("mtp.")

    def enter(self, model, phase: Phase, train_mtp: bool) -> None:
        model.set_csa_mode(phase.csa_mode, indexer_loss=phase.indexer_loss)
        for name, p in model.named_parameters():
            p.requires_grad_(self.trainable(name, phase, train_mtp))

    def sequences(self, tokens_seen: int, phase: Phase, per_step: int) -> int:
        return self.cfg.batch.global_batch

    def layout_error(self, phase: Phase, step: int, world: int) -> Exception | None:
        return None

    def replay_tokens(self, steps: int, per_step: int) -> int:
        tokens = 0
        for s in range(steps):
            phase = self.phase(s)
            tokens += self.sequences(tokens, phase, per_step) * phase.seq_len
        return tokens
