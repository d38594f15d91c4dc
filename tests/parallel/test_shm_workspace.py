"""DeepSpeed's CPU shared-memory all-reduce leaves a ~66 MB file per rank in /dev/shm unless
`train.dist.release_shm_workspace` unlinks it; the process group must keep working afterwards, its
shared-memory all-reduce included.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers.distributed import run_distributed


def _init_release_reduce(rank: int, world: int) -> tuple[bool, bool, float]:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_SIZE=str(world))  # as DeepSpeed's launcher
    import deepspeed
    import torch

    from train.dist import release_shm_workspace, shm_workspace_path

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    path = shm_workspace_path()
    built = deepspeed.comm.comm.cdb.shm_comm_op is not None  # False where the op cannot build
    created = os.path.exists(path) == built
    release_shm_workspace()
    left = os.path.exists(path)
    x = torch.full((8,), float(rank + 1))
    deepspeed.comm.all_reduce(x)
    y = torch.full((8,), float(rank + 1))
    deepspeed.comm.inference_all_reduce(y)  # the shared-memory path, through the mappings
    return created, left, float(x[0]) + float(y[0])


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_shm_workspace_is_unlinked_and_collectives_still_work():
    results = run_distributed(_init_release_reduce, 2, timeout=180)
    for created, left, reduced in results:
        assert not left
        assert reduced == 6.0
        assert created  # the file existed exactly where DeepSpeed built the shared-memory op
