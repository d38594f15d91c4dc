"""DeepSeek-V4's training phases as a pure function of the optimizer step (spec §10.3).

    step < csa_dense_until                       CSA dense, whole model trains
    csa_dense_until ≤ step < + indexer_warmup     CSA dense + indexer KL, only the indexer trains
    later                                        CSA sparse (indexer top-k) + indexer KL
    MTP weight 0.3, then 0.1 from the start of the LR decay
    sequence length from the last `seq_len_stages` entry whose step has been reached

Being a function of the step, a resumed run lands in exactly the phase it left.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import RecipeSection, raise_problems, recipe_problems


@dataclass(frozen=True)
class Phase:
    csa_mode: str
    indexer_loss: bool
    indexer_only: bool
    mtp_weight: float
    seq_len: int


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
