"""Checkpoint weights written and read by every rank (`train/weights_io.py`) on real gloo ranks:
world 4 with EP 2 at ZeRO-3, the hardest layout (dense block weights live on one owner each,
expert slices on one owner of each expert-data-parallel pair, the rest everywhere), after one
training step so that every tensor differs from its initialisation.

The files several ranks wrote read back as the full model, bit for bit equal to the gathered
state (no arithmetic happens on the way: exact equality holds by construction), and load again
into another layout (world 2, EP 1, ZeRO-3: each rank reads only what it holds) to the same
bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.distributed import run_distributed
from tests.helpers.weights import read_weights

pytest.importorskip("deepspeed")


def _full_state(model, groups) -> dict:
    from optim.weight_sharding import weights_gathered
    from train import expert_parallel as ep

    with weights_gathered(model):
        return {k: v.detach().float().numpy().copy()
                for k, v in ep.full_state_dict(model, groups).items()}


def _save(rank: int, world: int, directory: str) -> dict:
    import torch.distributed as dist

    from tests.parallel import harness
    from train.dist import DistInfo
    from train.weights_io import save_weights

    model, opt, engine, groups = harness.build(2, zero_stage=3)
    rows = harness.global_batches(1, model.cfg.vocab_size)[0][rank::world]
    harness.step_on(rows, model, opt, engine, groups)
    if rank == 0:
        Path(directory).mkdir()
    dist.barrier()
    info = DistInfo(rank, world, rank, __import__("torch").device("cpu"))
    save_weights(model, Path(directory), info, groups, max_shard_bytes=1 << 16)
    return _full_state(model, groups)


def _load(rank: int, world: int, directory: str) -> dict:
    from tests.parallel import harness
    from train.checkpoint import load_weights

    model, opt, engine, groups = harness.build(1, zero_stage=3)
    load_weights(Path(directory), model, "cpu")
    return {"state": _full_state(model, groups)}


def test_every_rank_writes_its_share_and_any_layout_reads_it_back(tmp_path):
    directory = str(tmp_path / "model")
    full = run_distributed(_save, 4, directory, timeout=150)[0]
    writers = {p.name.split("-")[1] for p in Path(directory).glob("model-rank*.safetensors")}
    assert len(writers) >= 3, writers                     # the writing is spread over ranks
    read = read_weights(directory)
    assert read.keys() == full.keys()
    for k, v in full.items():
        assert np.array_equal(read[k].float().numpy(), v), k
    for r, got in enumerate(run_distributed(_load, 2, directory, timeout=150)):
        for k, v in full.items():
            assert np.array_equal(got["state"][k], v), (r, k)
