"""Context parallelism (`model/context_parallel.py`, `model/cp_attention.py`) against the plain
forward: CP = 2 and 4 (real gloo processes) give the loss and every gradient of CP = 1, in dense
and sparse CSA, with the indexer KL, the balance loss and MTP on, on rows whose length (136) is
no multiple of the window (12) or the HCA ratio (12 → 136 = 11·12 + 4) and whose documents cross
chunk boundaries (one shorter than a chunk).

Tolerance. Everything is fp32. The CP forward computes the same products in another order (the
window through a halo, entries pooled per chunk then gathered, each rank's gradient summed over
ranks), so the results differ by rounding only. Measured: the plain fp32 model itself differs
from fp64 by up to 1.3e-4 of a tensor's largest gradient (mHC head biases, sums of ~10^3 terms
that cancel), most tensors by ~1e-6. So each gradient tensor must agree within 1e-3 of its
largest entry (and the loss within 1e-5 relative). A wrong halo, a lost entry or a gradient not
returned to its owner moves whole tensors by O(1) of their scale (checked: a zeroed halo fails).
"""

import numpy as np
import pytest
import torch

from tests.helpers.distributed import run_distributed

from .cp_support import cp_config, loss_and_grads, packed_rows


def _compare(ref: dict, ranks: list[dict]) -> None:
    for key in ("loss", "lm", "mtp", "balance", "indexer"):
        total = sum(r[key] for r in ranks)
        assert total == pytest.approx(ref[key], rel=1e-5, abs=1e-4), key
    assert set(ranks[0]["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        got = sum(r["grads"][name] for r in ranks)
        scale = max(float(np.abs(g).max()), 1e-8)
        assert float(np.abs(got - g).max()) <= 1e-3 * scale, name


def _both_modes(rank: int, world: int) -> dict:
    return {mode: loss_and_grads(rank, world, mode) for mode in ("dense", "sparse")}


@pytest.mark.parametrize("world", [2, 4])
def test_cp_equals_one_rank(world):
    ranks = run_distributed(_both_modes, world, timeout=300)
    for mode in ("dense", "sparse"):
        _compare(loss_and_grads(0, 1, mode), [r[mode] for r in ranks])


def test_cp_path_on_one_rank_is_the_plain_forward():
    """The CP code path with size 1 (no communication) gives the plain forward's outputs."""
    from model.context_parallel import ContextParallel
    from tests.parallel.cp_support import build_model

    b = packed_rows()
    model = build_model(cp_config(), "sparse")
    with torch.no_grad():
        plain = model(b["input_ids"], doc_ids=b["doc_ids"], positions=b["positions"])
        model.context_parallel = cp = ContextParallel(1)
        sharded = model(b["input_ids"], doc_ids=b["doc_ids"], positions=b["positions"])
    torch.testing.assert_close(cp.take(plain.logits), sharded.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cp.take(plain.mtp_logits[0]), sharded.mtp_logits[0], rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_chunks_and_owned_blocks_partition_the_row(size):
    """Every token is held by exactly one rank, early and late chunks balanced; every valid
    compressed entry is pooled by exactly one rank, from whole blocks inside its halo + chunk,
    and the gather's source map points at that rank's slot."""
    from model.context_parallel import ContextParallel

    b = packed_rows()
    seq = b["doc_ids"].shape[1]
    held = torch.cat([ContextParallel(size, r).local_index(seq) for r in range(size)])
    assert sorted(held.tolist()) == list(range(seq))
    for ratio, lead in ((4, 8), (12, 12)):
        seen = {}
        for r in range(size):
            shard = ContextParallel(size, r).shard(b["doc_ids"], b["positions"])
            layout, _, owned = shard.layout(ratio)
            local = owned.local_layout(shard, layout, lead)
            assert (local.start[owned.valid] >= 0).all()
            assert (local.start[owned.valid] + ratio <= lead + shard.chunk).all()
            prev_ok = (local.start - ratio >= 0) | ~local.has_prev
            assert prev_ok.all() or ratio != 4
            rows = owned.index.view(shard.batch, 2, -1)
            valid = owned.valid.view(shard.batch, 2, -1)
            for bi in range(shard.batch):
                for slot in range(2):
                    for e, i in enumerate(rows[bi, slot][valid[bi, slot]].tolist()):
                        assert (bi, i) not in seen
                        seen[(bi, i)] = (r * 2 + slot) * owned.per_chunk + e
        layout = ContextParallel(1).shard(b["doc_ids"], b["positions"]).layout(ratio)[0]
        expected = {(bi, i) for bi in range(layout.valid.shape[0])
                    for i in layout.valid[bi].nonzero().flatten().tolist()}
        assert set(seen) == expected
        shard = ContextParallel(size, 0).shard(b["doc_ids"], b["positions"])
        source = shard.layout(ratio)[2].source
        for (bi, i), slot in seen.items():
            assert source[bi, i] == slot


def test_bad_sequence_length_is_named():
    from model.context_parallel import ContextParallel

    b = packed_rows(seq=130)
    with pytest.raises(ValueError, match="130 is not a multiple of 2·cp_size = 4"):
        ContextParallel(2, 0).shard(b["doc_ids"], b["positions"])
