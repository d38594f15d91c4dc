"""G-M6: Muon sharded by whole matrices over 2 real gloo ranks equals single-process Muon.

ToyNet has 5 Muon tensors (an odd count, so the ranks own different numbers of them; one is a
stacked [E, n, m] expert tensor, one is row-blocked) and 4 AdamW tensors. Each rank takes half of
every batch and averages gradients with an all-reduce (what DDP / DeepSpeed stage 0 do).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import optim
from tests.helpers.distributed import run_distributed
from tests.optim.toy import ToyNet, toy_batch

STEPS = 3
TENSOR_KEYS = ("after3", "after4", "momentum")


def _step(model, opt, step, rank=0, world=1):
    batch = toy_batch(8, seed=step)[rank::world]
    model.loss(batch).backward()
    if world > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
    opt.step()
    opt.zero_grad(set_to_none=True)


def _rank_fn(rank, world):
    model = ToyNet()
    opt = optim.build_optimizer(model, lr=1e-2)
    assert opt.process_group is not None
    for step in range(STEPS):
        _step(model, opt, step, rank, world)
    owned = {n for n, o in opt.ownership().items() if o == rank}
    n_momentum = sum("momentum_buffer" in s for s in opt.state.values())
    sd = opt.state_dict()                        # collective: consolidated on every rank
    after3 = {n: p.detach().clone() for n, p in model.named_parameters()}
    shard = opt.sharded_state_dict()             # no communication: this rank's entries only
    n_shard = sum("momentum_buffer" in s for s in shard["state"].values())
    from_shard = optim.build_optimizer(model, lr=1e-2)
    from_shard.load_state_dict(shard)
    same_as_shard = all(torch.equal(from_shard.state[p]["momentum_buffer"],
                                    opt.state[p]["momentum_buffer"])
                        for p in from_shard.state if "momentum_buffer" in from_shard.state[p])
    # resume on a fresh optimizer from the consolidated state, one more step
    fresh = optim.build_optimizer(model, lr=1e-2)
    fresh.load_state_dict(sd)
    n_loaded = sum("momentum_buffer" in s for s in fresh.state.values())
    _step(model, fresh, STEPS, rank, world)
    after4 = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = {opt.param_groups[0]["param_names"][i]: s["momentum_buffer"]
                for i, s in sd["state"].items() if i < len(opt.param_groups[0]["params"])}
    return dict(after3=_np(after3), after4=_np(after4), owned=owned, n_momentum=n_momentum,
                n_loaded=n_loaded, momentum=_np(momentum), ns_matrices=opt.ns_matrices,
                n_shard=n_shard, same_as_shard=same_as_shard)


def _np(tensors: dict) -> dict:
    """Tensors leave the child by value (torch's queue would pass shared-memory handles, which
    break once the child exits)."""
    return {k: v.numpy() for k, v in tensors.items()}


def _reference():
    model = ToyNet()
    opt = optim.build_optimizer(model, lr=1e-2)
    assert opt.process_group is None
    for step in range(STEPS):
        _step(model, opt, step)
    after3 = {n: p.detach().clone() for n, p in model.named_parameters()}
    sd = opt.state_dict()
    ns_after3 = opt.ns_matrices
    names = opt.param_groups[0]["param_names"]
    # clone: like torch's, our state_dict references the live buffers
    momentum = {names[i]: s["momentum_buffer"].clone() for i, s in sd["state"].items()
                if i < len(names)}
    _step(model, opt, STEPS)
    after4 = {n: p.detach().clone() for n, p in model.named_parameters()}
    return after3, after4, momentum, ns_after3


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_ranks_match_single_process():
    results = run_distributed(_rank_fn, 2, timeout=150)
    ref3, ref4, ref_momentum, ref_ns = _reference()
    r0, r1 = ({k: ({n: torch.from_numpy(a) for n, a in v.items()} if k in TENSOR_KEYS else v)
               for k, v in r.items()} for r in results)
    # whole matrices split across ranks: 5 tensors → 3 + 2 (or similar), disjoint, complete
    assert r0["owned"] and r1["owned"] and not r0["owned"] & r1["owned"]
    assert len(r0["owned"] | r1["owned"]) == 5
    assert r0["n_momentum"] == len(r0["owned"]) and r1["n_momentum"] == len(r1["owned"])
    assert r0["n_loaded"] == len(r0["owned"]) and r1["n_loaded"] == len(r1["owned"])
    assert r0["n_shard"] == len(r0["owned"]) and r1["n_shard"] == len(r1["owned"])
    assert r0["same_as_shard"] and r1["same_as_shard"]
    # NS work is split, not repeated: together the ranks did exactly what one process did
    assert r0["ns_matrices"] + r1["ns_matrices"] == ref_ns and 0 < r0["ns_matrices"] < ref_ns
    for n in ref3:
        assert torch.equal(r0["after3"][n], r1["after3"][n]), n   # ranks stay identical
        assert _rel(r0["after3"][n], ref3[n]) <= 1e-5, (n, _rel(r0["after3"][n], ref3[n]))
        assert _rel(r0["after4"][n], ref4[n]) <= 1e-5, n
        assert torch.equal(r0["after4"][n], r1["after4"][n]), n
    assert set(r0["momentum"]) == set(ref_momentum) == set(r1["momentum"])
    for n, m in ref_momentum.items():
        assert _rel(r0["momentum"][n], m) <= 1e-5 and torch.equal(r0["momentum"][n],
                                                                   r1["momentum"][n]), n


def test_owner_assignment_balances_whole_matrices():
    from optim.distributed import assign_owners, ns_cost
    costs = [ns_cost(s) for s in [(8, 64, 32), (64, 32), (64, 32), (32, 32), (16, 16)]]
    owners = assign_owners(costs, 2)
    assert owners[0] != owners[1] or owners[0] != owners[2]      # the big one is not piled on
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(load) <= costs[0] + 1e-9 or max(load) / sum(load) < 0.75
    assert assign_owners(costs, 2) == owners                      # deterministic
    assert assign_owners(costs, 1) == [0] * 5
    assert sorted(set(assign_owners(costs, 7))) == [0, 1, 2, 3, 4]  # more ranks than matrices
