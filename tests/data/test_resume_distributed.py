"""Resuming on a different number of data-parallel ranks, in real gloo process groups: the
resumed job continues the global window sequence exactly where the first one stopped."""

from __future__ import annotations

import pytest

from data.config import DataConfig, SourceConfig
from data.pretrain import build_pretrain_loader
from tests.data._util import make_docs, write_jsonl
from tests.helpers.distributed import run_distributed

SEQ, MB, SEED = 32, 2, 7


def consume(rank, world, cfg, tok_path, state, steps):
    """One rank of a job: (optionally) resume, read `steps` batches, report rows and state."""
    import torch.distributed as dist

    assert dist.get_world_size() == world
    loader = build_pretrain_loader(cfg, tok_path, seq_len=SEQ, micro_batch=MB, dp_rank=rank,
                                   dp_world=world, seed=SEED)
    if state is not None:
        loader.load_state_dict(state)
    # plain lists: a tensor sent through the result queue is shared by file descriptor, which
    # can vanish when this process exits before the parent has read it
    rows = [next(loader)["input_ids"].tolist() for _ in range(steps)]
    loader.close()
    return rows, loader.state_dict()


@pytest.mark.slow
def test_resume_from_2_ranks_onto_3(tmp_path, tok_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(60, 41))
    cfg = DataConfig(sources=[SourceConfig(str(corpus))], cache_dir=str(tmp_path / "cache"),
                     progress=False, prefetch=4)
    ref = build_pretrain_loader(cfg, str(tok_path), seq_len=SEQ, micro_batch=1, seed=SEED)
    windows = [next(ref)["input_ids"][0].tolist() for _ in range(24)]  # uninterrupted sequence

    # The first job's two ranks run in this process (a loader needs no process group); the
    # resumed job is three real gloo processes, which also exercises the rank-0-first cache build.
    first = []
    for rank in range(2):
        loader = build_pretrain_loader(cfg, str(tok_path), seq_len=SEQ, micro_batch=MB,
                                       dp_rank=rank, dp_world=2, seed=SEED)
        first.append(([next(loader)["input_ids"].tolist() for _ in range(3)],
                      loader.state_dict()))
        loader.close()
    state = first[0][1]
    assert all(st == state for _, st in first) and state["cursor"] == 2 * MB * 3
    second = run_distributed(consume, 3, cfg, str(tok_path), state, 2, timeout=120)

    seen = {}
    for world, start, result in ((2, 0, first), (3, 12, second)):
        for rank, (rows, _) in enumerate(result):
            for step, batch in enumerate(rows):
                for j in range(MB):
                    g = start + step * world * MB + rank * MB + j
                    assert g not in seen  # nothing repeated
                    seen[g] = batch[j]
    assert sorted(seen) == list(range(24))  # nothing skipped
    for g, row in seen.items():
        assert row == windows[g], g
