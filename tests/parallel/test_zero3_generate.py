"""Generation from a ZeRO-3 model (`optim.weight_sharding`: each block's weights gathered from
their owners around every forward) on 2 gloo ranks, each with its own prompts and stopping
times, one rank with none: it completes (the ranks keep running forwards in lockstep through
the model's `forward_peer`; without it the rank that finishes first leaves the others waiting in
their next gather) and equals an unsharded copy of the same weights on the same prompts.

Exact equality is right here: the gathered weights are the owners' fp32 values bit for bit, and
each rank computes the same operations on the same rows as the copy (no expert parallelism, so
no batch composition or summation order changes).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.parallel.test_ep_generate import RANK0, RANK1

pytest.importorskip("deepspeed")


def _worker(rank: int, world: int) -> list:
    from model.generation import generate
    from model.transformer import Transformer
    from optim.weight_sharding import weights_gathered
    from tests.parallel import harness

    model, opt, engine, groups = harness.build(1, zero_stage=3)
    with weights_gathered(model):
        copy = Transformer(model.cfg)
        copy.load_state_dict(model.state_dict())
    held = model._weight_sharding.resident_bytes()
    cases = [(RANK0, dict(max_new_tokens=6, temperature=0)) if rank == 0 else
             (RANK1, dict(max_new_tokens=15, temperature=0)),
             ([], dict(max_new_tokens=4, temperature=0)) if rank == 0 else
             (RANK1, dict(max_new_tokens=4, temperature=0.9, top_p=0.9, seed=5))]
    out = []
    with torch.no_grad():
        for prompts, kw in cases:
            got = generate(model, prompts, return_logprobs=True, **kw) if prompts else \
                generate(model, prompts, **kw)
            if prompts:
                want = generate(copy, prompts, return_logprobs=True, **kw)
                out.append((got.tokens == want.tokens,
                            all(torch.equal(a, b) for a, b in zip(got.raw_logprobs,
                                                                  want.raw_logprobs))))
    # the weights were freed again after every forward
    return out + [model._weight_sharding.resident_bytes() == held]


def test_zero3_generation_keeps_ranks_in_lockstep_and_matches_unsharded_weights():
    for r, result in enumerate(run_distributed(_worker, 2, timeout=120)):
        assert all(x is True or x == (True, True) for x in result), (r, result)
