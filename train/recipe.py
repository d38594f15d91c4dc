"""DeepSeek-V4's training phases as a pure function of the optimizer step (spec §10.3).

    step < csa_dense_until                       CSA dense, whole model trains
    csa_dense_until ≤ step < + indexer_warmup     CSA dense + indexer KL, only the indexer trains
    later                                        CSA sparse (indexer top-k) + indexer KL
    MTP weight 0.3, then 0.1 from the start of the LR decay
    sequence length from the last `seq_len_stages` entry whose step has been reached

Being a function of the step, a resumed run lands in exactly the phase it left.
"""

from __future__ import annotations

from .config import RecipeSection, raise_problems, recipe_problems
from .schedule import Phase, StageSchedule

__all__ = ["Phase", "RecipeSchedule", "phase_at", "validate_recipe"]


def phase_at(step: int, recipe: RecipeSection, decay_start: int, base_seq_len: int) -> Phase:
    warm_end = recipe.csa_dense_until + recipe.indexer_warmup_steps
    if step < recipe.csa_dense_until:
        mode, idx_loss, idx_only = "dense", False, False
    elif step < warm_end:
        mode, idx_loss, idx_only = "dense", True, True
    else:
        mode, idx_loss, idx_only = "sparse", True, False
    seq_len = base_seq_len
    for stage in recipe.seq_len_stages:
        if step >= stage.step:
            seq_len = stage.seq_len
    mtp = recipe.mtp_weight if step < decay_start else recipe.mtp_weight_after_decay
    return Phase(mode, idx_loss, idx_only, mtp, seq_len)


def validate_recipe(recipe: RecipeSection) -> None:
    """The recipe's ranges and stage order (the launcher checks the whole config at start-up
    with `train.config.validate_config`, which includes these)."""
    raise_problems(recipe_problems(recipe))


class RecipeSchedule(StageSchedule):
    """The pre-training recipe as a stage schedule (`train.schedule.StageSchedule`'s hooks):
    the phases above (the indexer warm-up trains only the indexer), the batch-size ramp and
    `batch.per_stage` (`train.config.step_sequences`), and each sequence-length stage's layout
    check under context parallelism (`train.context_parallel.stage_error`). `decay_start`: the
    LR schedule's first decay step (the MTP weight drops there). SFT uses it too."""

    def __init__(self, cfg, model_cfg, decay_start: int):
        super().__init__(cfg)
        self.model_cfg, self.decay_start = model_cfg, decay_start

    def phase(self, step: int) -> Phase:
        return phase_at(step, self.cfg.recipe, self.decay_start, self.cfg.data.seq_len)

    def trainable(self, name: str, phase: Phase, train_mtp: bool) -> bool:
        return ((not phase.indexer_only or ".attn.indexer." in name)
                and super().trainable(name, phase, train_mtp))

    def sequences(self, tokens_seen: int, phase: Phase, per_step: int) -> int:
        from .config import step_sequences

        return step_sequences(self.cfg, tokens_seen, phase.seq_len, per_step)

    def layout_error(self, phase: Phase, step: int, world: int) -> Exception | None:
        from .context_parallel import stage_error

        return stage_error(self.model_cfg, self.cfg, world, phase.seq_len, step)
