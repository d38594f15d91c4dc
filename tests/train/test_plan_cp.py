"""The planner under context parallelism (`train.plan`, `train.plan_cp`) and the batch rule
across sequence-length stages (`batch.per_stage`)."""

import pytest

from model.config import get_config
from train.plan import make_plan
from train.plan_cp import (exchange_bytes, long_context_table, ring_attention_bytes,
                           smallest_fitting_cp)

GIB = 2 ** 30


def test_cp_divides_activations_and_adds_the_exchange():
    cfg = get_config("flash")
    one = make_plan(cfg, 64, 64, 1, 65536, 64, True, "block", zero_stage=2)
    eight = make_plan(cfg, 64, 64, 1, 65536, 8, True, "block", zero_stage=2, cp=8)
    assert eight.activations == pytest.approx(one.activations / 8, rel=1e-9)
    assert eight.weights == one.weights and eight.optimizer == one.optimizer
    assert (eight.dp, eight.cp) == (8, 8)
    names = [t.name for t in eight.comm]
    assert "cp attention exchange" in names and "cp attention exchange" not in \
        [t.name for t in one.comm]
    assert "each sequence over 8 ranks, 8,192 tokens each" in eight.format()


@pytest.mark.parametrize("seq_len, cp", [(16384, 4), (65536, 16), (1 << 20, 128)])
def test_exchange_is_a_fraction_of_ring_attention(seq_len, cp):
    """The compressed stream is seq/4 (CSA, plus the indexer's narrower keys) or seq/128 (HCA);
    sliding-window layers move only their halo: well under a third of raw K=V."""
    cfg = get_config("flash").replace(max_seq_len=1 << 20)
    halo, gather = exchange_bytes(cfg, seq_len, cp)
    ring = ring_attention_bytes(cfg, seq_len, cp)
    assert 0 < halo + gather < 0.3 * ring


def test_smallest_fitting_cp_is_the_first_that_fits():
    cfg = get_config("flash")
    cp, plan = smallest_fitting_cp(cfg, 64, 64, 65536, 75_497_472, 120 * GIB)
    assert plan.total <= 120 * GIB
    smaller = make_plan(cfg, 64, 64, 1, 65536, 1152, True, "block", zero_stage=2, cp=cp // 2)
    assert smaller.total > 120 * GIB
    assert cp == 16


def test_flash_long_context_rows_fit_256_ranks():
    table = long_context_table(rows=(("flash", 16384, 256), ("flash", 65536, 256)))
    lines = table.splitlines()[2:]
    assert len(lines) == 2 and all("none" not in line for line in lines)


def test_stage_batches_keep_tokens():
    from omegaconf import OmegaConf

    from train.config import SeqStage, TrainConfig, config_problems, sequences_at

    cfg = OmegaConf.structured(TrainConfig)
    cfg.batch.global_batch = 64
    cfg.recipe.seq_len_stages = [SeqStage(0, 512), SeqStage(10, 2048)]
    assert sequences_at(cfg, 64, 2048) == 16
    cfg.batch.per_stage = "sequences"
    assert sequences_at(cfg, 64, 2048) == 64
    cfg.batch.per_stage = "tokens"
    cfg.recipe.seq_len_stages[1].seq_len = 3000
    problems = config_problems(cfg)
    assert any("recipe.seq_len_stages[1].seq_len=3000" in p and "batch.per_stage=sequences" in p
               for p in problems)
    cfg.batch.per_stage = "bytes"
    assert any("batch.per_stage='bytes'" in p for p in config_problems(cfg))


def test_layout_problem_names_a_cp_that_works():
    from omegaconf import OmegaConf

    from train.config import TrainConfig
    from train.context_parallel import layout_problem

    cfg = OmegaConf.structured(TrainConfig)
    cfg.batch.global_batch, cfg.data.micro_batch, cfg.parallel.cp_size = 8, 1, 8
    tiny = get_config("tiny")
    assert layout_problem(tiny, cfg, 8, 2048) is None
    problem = layout_problem(tiny, cfg, 8, 128)  # chunks of 8 < 16
    assert "cannot run with parallel.cp_size=8" in problem and "parallel.cp_size=4" in problem
