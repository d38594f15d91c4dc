"""`train.memory.SectionPeak` on CPU: it counts what the section's ops allocate, once per
storage, and stops counting a storage when its last tensor is freed."""

from __future__ import annotations

import torch

from train.memory import SectionPeak

CPU = torch.device("cpu")


def test_the_peak_is_the_most_live_at_once_not_the_sum():
    with SectionPeak(CPU) as peak:
        for _ in range(5):
            a = torch.ones(1000)        # 4000 bytes, freed when `a` is rebound
            b = a * 2                   # 4000 more while both are live
            del b
        del a
    assert peak.bytes == 8000


def test_views_and_in_place_results_add_nothing():
    outside = torch.zeros(1000)
    with SectionPeak(CPU) as peak:
        outside.add_(1)                  # in place on an older tensor
        view = outside[:10].view(2, 5)   # a view of it
        mine = torch.empty(250)          # 1000 bytes
        alias = mine[5:]                 # same storage
        del view, alias
    assert peak.bytes == 1000
    assert peak.gib == 1000 / 2**30


def test_autograd_buffers_are_counted():
    x = torch.randn(100, 100, requires_grad=True)
    with SectionPeak(CPU) as peak:
        (x.exp() * 3).sum().backward()
    # exp's output (kept for backward), the product, and the gradients: a few 40 kB buffers
    assert 2 * 40_000 <= peak.bytes <= 6 * 40_000
