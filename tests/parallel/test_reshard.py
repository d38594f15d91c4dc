"""Resuming at another layout (`train.reshard`) on real gloo ranks, through the trainer's own
checkpoint code: a run at world 2, EP 2 and whole-matrix ZeRO-2 writes a checkpoint after step
2 and goes on to step 3; the checkpoint is resumed at world 4, EP 1, ZeRO 0 (2→4 ranks, EP 2→1,
sharded→unsharded at once: expert stacks of Muon momentum are rebuilt from both EP ranks'
files, every other state comes from its owner's file) and takes the same step 3.

The same global batch meets the same weights and optimizer state, so step 3's loss, gradient
norm, every gradient and the weights after it agree with the run that never changed layout,
within the EP-parity tolerances (`test_ep_parity`: only the order of fp32 sums differs). A lost
momentum (a fresh buffer) changes Muon's direction and moves weights by ~lr (2e-3), far outside.
"""

from __future__ import annotations

import pytest

from tests.helpers.distributed import run_distributed
from tests.parallel.harness import train
from tests.parallel.test_ep_parity import _compare

pytest.importorskip("deepspeed")


def test_world_2_ep2_zero2_resumes_at_world_4_ep1_zero0(tmp_path):
    ckpt_dir = str(tmp_path)
    straight = run_distributed(train, 2, 2, 3, None, 2, ckpt_dir, 2, False, 2, timeout=150)
    resumed = run_distributed(train, 4, 1, 3, None, 0, ckpt_dir, None, True, timeout=150)
    ref = dict(straight[0], loss=straight[0]["loss"][2:], norm=straight[0]["norm"][2:])
    for r, got in enumerate(resumed):
        assert len(got["loss"]) == 1                     # only step 3 ran
        _compare(ref, got, f"resumed at world 4, EP 1, ZeRO 0: rank {r}")


def test_zero3_resumes_bitwise_and_at_another_world_size(tmp_path):
    """Stage 3 (block weights on their owners only): the checkpoint written at world 2, EP 2
    after step 2 (gathered into the consolidated weights file) resumes in the same layout with
    step 3 bitwise equal to the run that went on, and at world 4 (EP 2, so the experts are
    sharded over their expert-data-parallel pairs too) within the parity tolerances."""
    import numpy as np

    ckpt_dir = str(tmp_path)
    straight = run_distributed(train, 2, 2, 3, None, 3, ckpt_dir, 2, False, 2, timeout=150)
    same = run_distributed(train, 2, 2, 3, None, 3, ckpt_dir, None, True, timeout=150)
    for r, (a, b) in enumerate(zip(straight, same)):
        assert b["loss"] == a["loss"][2:] and b["norm"] == a["norm"][2:], r
        for k, w in a["weights"].items():
            assert np.array_equal(w, b["weights"][k]), (r, k)
    wider = run_distributed(train, 4, 2, 3, None, 3, ckpt_dir, None, True, timeout=150)
    ref = dict(straight[0], loss=straight[0]["loss"][2:], norm=straight[0]["norm"][2:])
    for r, got in enumerate(wider):
        _compare(ref, got, f"ZeRO-3 resumed at world 4: rank {r}")
