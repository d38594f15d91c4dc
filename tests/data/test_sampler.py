"""The mixture schedule and the rank/cursor arithmetic, against brute force."""

from __future__ import annotations

import pytest

from data.sampler import DistributedSampler, MixtureSchedule, quotas


def test_quotas_sum_to_block_and_follow_weights():
    q = quotas([1, 1, 1], 10)
    assert q.sum() == 10 and sorted(q.tolist()) == [3, 3, 4]
    assert quotas([0.7, 0.2, 0.1], 10_000).tolist() == [7000, 2000, 1000]
    with pytest.raises(ValueError, match=r"source 1 weight=1e-06"):
        MixtureSchedule([1.0, 1e-6], seed=0)


def test_locate_matches_counting_from_scratch():
    sched = MixtureSchedule([0.5, 0.3, 0.2], seed=4, block=100)
    seen = [0, 0, 0]
    for g in range(700):  # several blocks, so the per-block offsets are exercised
        s, c = sched.locate(g)
        assert c == seen[s]
        seen[s] += 1
    assert seen == [350, 210, 140]  # exact after whole blocks (50/30/20 per block)


def test_schedule_is_seeded():
    a, b = (MixtureSchedule([1, 1], seed=s, block=64) for s in (1, 2))
    sa = [a.locate(g)[0] for g in range(64)]
    assert sa == [MixtureSchedule([1, 1], seed=1, block=64).locate(g)[0] for g in range(64)]
    assert sa != [b.locate(g)[0] for g in range(64)]


def test_ranks_partition_the_global_sequence():
    world, mb = 3, 2
    samplers = [DistributedSampler([1.0], 0, r, world, mb) for r in range(world)]
    got = [w for cur in (0, 6, 12) for s in samplers for w in s.batch_at(cur)]
    assert got == [(0, g) for g in range(18)]


def test_state_checks_identity_and_version():
    s = DistributedSampler([1.0, 2.0], 7, 0, 1, 4, {"seq_len": 64})
    s.cursor = 40
    state = s.state_dict()
    t = DistributedSampler([1.0, 2.0], 7, 0, 1, 4, {"seq_len": 64})
    t.load_state_dict(state)
    assert t.cursor == 40
    for change in ({"seq_len": 128}, {"seed": 8}, {"weights": [1.0, 1.0]}, {"version": 99}):
        with pytest.raises(ValueError, match=next(iter(change))):
            t.load_state_dict({**state, **change})
    with pytest.raises(ValueError, match="dp_rank=2"):
        DistributedSampler([1.0], 0, 2, 2, 1)
