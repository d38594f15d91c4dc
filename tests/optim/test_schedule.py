"""LR schedules (warm-up → constant → decay → floor; V4, cosine, linear, WSD) and the batch ramp."""

from __future__ import annotations

import math

import pytest
import torch

from optim import LRSchedule, batch_size_ramp, make_scheduler
from optim.schedule import cosine_schedule, linear_schedule, v4_schedule, wsd_schedule


def test_v4_schedule_shape():
    s = v4_schedule(total_steps=10_000, decay_steps=2_000)   # warm-up 2000, floor 0.1
    assert s(0) == pytest.approx(1 / 2000) and s(999) == pytest.approx(0.5)
    assert s(1999) == 1.0 and s(2000) == 1.0 and s(7999) == 1.0      # peak held
    assert s(8000) == 1.0 and s(9000) == pytest.approx(0.55)          # cosine midpoint
    assert s(10_000) == pytest.approx(0.1) and s(50_000) == pytest.approx(0.1)
    vals = [s(t) for t in range(8000, 10_001, 50)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))                # monotone decay


def test_variants():
    c = cosine_schedule(1100, warmup_steps=100, min_ratio=0.0)
    assert c(100) == 1.0 and c(600) == pytest.approx(0.5) and c(1100) == pytest.approx(0.0)
    lin = linear_schedule(1100, warmup_steps=100, min_ratio=0.1)
    assert lin(600) == pytest.approx(0.55) and lin(1100) == pytest.approx(0.1)
    w = wsd_schedule(1000, warmup_steps=100, decay_fraction=0.2)
    assert w(799) == 1.0 and w(1000) == pytest.approx(0.0)
    assert w(850) == pytest.approx(1 - math.sqrt(0.25))
    with pytest.raises(ValueError, match="overlaps the warm-up"):
        LRSchedule(total_steps=1000, warmup_steps=900, decay_steps=200)
    with pytest.raises(ValueError, match="decay="):
        LRSchedule(total_steps=10, warmup_steps=0, decay="step")


def test_lambda_lr_drives_param_groups():
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q]}], lr=2.7e-4)
    sched = make_scheduler(opt, v4_schedule(total_steps=40, decay_steps=10, warmup_steps=10))
    lrs = []
    for _ in range(41):
        lrs.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.7e-5) and lrs[9] == pytest.approx(2.7e-4)
    assert lrs[29] == pytest.approx(2.7e-4) and lrs[40] == pytest.approx(2.7e-5)


def test_batch_size_ramp():
    # V3: 3072 → 15360 sequences over the first 469B tokens
    kw = dict(start=3072, end=15360, ramp=469_000_000_000, multiple_of=64)
    assert batch_size_ramp(0, **kw) == 3072
    mid = batch_size_ramp(234_500_000_000, **kw)
    assert mid == (3072 + 15360) // 2 // 64 * 64 and mid % 64 == 0
    assert batch_size_ramp(469_000_000_000, **kw) == 15360
    assert batch_size_ramp(10 ** 13, **kw) == 15360
    sizes = [batch_size_ramp(t, **kw) for t in range(0, 469_000_000_000, 10_000_000_000)]
    assert all(a <= b for a, b in zip(sizes, sizes[1:])) and all(s % 64 == 0 for s in sizes)
    assert batch_size_ramp(5, start=8, end=8, ramp=0) == 8
    with pytest.raises(ValueError, match="multiples"):
        batch_size_ramp(0, start=100, end=200, ramp=10, multiple_of=64)
