"""The trainer builds the model on the meta device, shards it, then materialises it with
`to_empty`, which replaces every Parameter object and with them the expert tags DeepSpeed reads.
Untagged, DeepSpeed's start-up broadcast copied rank 0's experts over every rank's own (and
its reduction averaged the gradients of different experts): EP training silently held half the
experts. These tests pin the tags through that path and the experts through the engine."""

from __future__ import annotations

import pytest

from tests.helpers.distributed import run_distributed

pytest.importorskip("deepspeed")


def _materialise_and_engine(rank: int, world: int) -> tuple[bool, bool, float, float]:
    import deepspeed
    import torch

    from model.transformer import Transformer
    from tests.parallel.harness import _no_shm, small_config
    from train import expert_parallel as ep

    _no_shm()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(small_config())
    groups = ep.create_groups(2)
    ep.shard_model(model, groups)
    model.to_empty(device="cpu")
    try:
        ep.check_expert_marks(model, groups)
        untagged_caught = False
    except RuntimeError as e:
        untagged_caught = "lost their DeepSpeed expert-group tags" in str(e)
    ep.mark_expert_params(model, groups)
    ep.check_expert_marks(model, groups)
    model.init_weights()
    w = model.layers[0].ffn.experts.w1
    with torch.no_grad():
        w.fill_(float(rank + 1))  # each rank's experts are its own
    before = float(w.sum())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
        "steps_per_print": 1 << 30})
    return untagged_caught, True, before, float(model.layers[0].ffn.experts.w1.sum())


def test_materialised_experts_keep_their_tags_and_survive_the_engine():
    results = run_distributed(_materialise_and_engine, 2, timeout=180)
    for rank, (caught, _, before, after) in enumerate(results):
        assert caught, "check_expert_marks must notice the tags that to_empty dropped"
        assert after == before, f"rank {rank}: the engine overwrote this rank's experts"
    assert results[0][2] != results[1][2]
