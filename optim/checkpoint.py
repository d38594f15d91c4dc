"""Saving and restoring `MuonAdamW` state, with Muon momentum spread over owner ranks.

Two layouts, both torch's ({"state": {index: {...}}, "param_groups": [...]}):

- consolidated (`state_dict`): the owners broadcast their momentum, so every rank returns the
  full state. A collective: call it on all ranks (DeepSpeed stage 0 does; it then writes rank 0's
  copy). Restores at any world size, since `load_state_dict` keeps what each rank owns.
- sharded (`sharded_state_dict`): each rank's own entries plus `muon_shard` (world size and
  ownership plan). No communication and 1/world of the momentum per file; restores only at the
  same world size and plan, which is checked.

State keeps its saved dtype on load (fp32 momentum stays fp32 for bf16 parameters, unlike
torch's default of casting state to the parameter dtype) and is copied, never aliased.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from .distributed import group_rank_size


def _indexed(opt):
    """(global index, group, param) in torch's packing order (groups, then params)."""
    idx = 0
    for group in opt.param_groups:
        for p in group["params"]:
            yield idx, group, p
            idx += 1


def _pack(opt, muon_state: dict[int, dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, group, p in _indexed(opt):
        if group["use_muon"]:
            if id(p) in muon_state:
                state[idx] = dict(muon_state[id(p)])
        elif p in opt.state and opt.state[p]:
            state[idx] = dict(opt.state[p])
    groups, idx = [], 0
    for group in opt.param_groups:
        # shard_group holds a live process group: not picklable and meaningless elsewhere
        saved = {k: v for k, v in group.items() if k not in ("params", "shard_group")}
        saved["params"] = list(range(idx, idx + len(group["params"])))
        idx += len(group["params"])
        groups.append(saved)
    return {"state": state, "param_groups": groups}


def _owned_state(opt) -> dict[int, dict[str, Any]]:
    """Owned Muon parameters' state: momentum, and the fp32 master when gradients are sharded."""
    return {id(p): dict(opt.state[p]) for p in _owned(opt) if opt.state.get(p)}


def _owned(opt) -> list[torch.Tensor]:
    return [p for (_, _, p, _), mine in zip(opt._muon_params(), opt.owned_flags()) if mine]


def consolidated_state_dict(opt) -> dict[str, Any]:
    """Every rank gets the momentum of its own parameters (under expert parallelism: of the
    experts it holds; owners broadcast within each shard domain)."""
    items = list(opt._muon_params())
    owned = opt.owned_flags()
    have = [mine and "momentum_buffer" in opt.state.get(p, {})
            for (_, _, p, _), mine in zip(items, owned)]
    if opt.process_group is not None and items:
        flags = torch.tensor(have, dtype=torch.float32, device=items[0][2].device)
        dist.all_reduce(flags, group=opt.process_group)   # which momenta exist anywhere
        have = [bool(f) for f in flags.tolist()]
    out: dict[int, torch.Tensor] = {}
    for (_, _, p, _), mine, present in zip(items, owned, have):
        if present:
            out[id(p)] = opt.state[p]["momentum_buffer"] if mine else \
                torch.empty(p.shape, dtype=torch.float32, device=p.device)
    placeholder = torch.empty(0)
    opt.broadcast_owned(lambda n, p: out.get(id(p), placeholder))
    return _pack(opt, {k: {"momentum_buffer": v} for k, v in out.items()})


def sharded_state_dict(opt) -> dict[str, Any]:
    sd = _pack(opt, _owned_state(opt))
    me, world = group_rank_size(opt.process_group)
    sd["muon_shard"] = {"world": world, "rank": me, "owners": list(opt.owners()),
                        "zero_stage": opt.zero_stage}
    if opt.sharded:
        sd["muon_shard"]["all_owners"] = list(opt.all_owners())
    return sd


def load_state_dict(opt, state_dict: dict[str, Any]) -> None:
    _check_compatible(opt, state_dict)
    for group, saved in zip(opt.param_groups, state_dict["param_groups"]):
        for k, v in saved.items():
            if k not in ("params", "param_names", "shapes", "shard_group"):
                group[k] = v
    owned = {id(p) for p in _owned(opt)}
    if opt.sharded:  # every parameter's state lives on its owner only
        owned |= {id(p) for (_, _, p, _), mine in zip(opt._all_params(), opt.owns()) if mine}
    opt.state = defaultdict(dict)
    opt._acc.clear()
    opt._local.clear()
    saved_state = {int(k): v for k, v in state_dict["state"].items()}
    for idx, group, p in _indexed(opt):
        entry = saved_state.get(idx)
        if entry is None or ((group["use_muon"] or opt.sharded) and id(p) not in owned):
            continue
        opt.state[p] = {k: _restore(k, v, p) for k, v in entry.items()}


def _check_compatible(opt, state_dict: dict[str, Any]) -> None:
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"optimizer state has {len(saved_groups)} parameter groups, this "
                         f"optimizer has {len(opt.param_groups)}")
    for n, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]) or \
                bool(saved.get("use_muon")) != group["use_muon"]:
            raise ValueError(f"parameter group {n}: saved {len(saved['params'])} params "
                             f"(use_muon={saved.get('use_muon')}), have {len(group['params'])} "
                             f"(use_muon={group['use_muon']})")
        names = saved.get("param_names")
        if names is not None and list(names) != list(group["param_names"]):
            bad = next(a for a, b in zip(names, group["param_names"]) if a != b)
            raise ValueError(f"parameter group {n}: saved parameter {bad!r} does not match "
                             f"this model's parameters at the same position")
        if group["use_muon"] and [tuple(s) for s in saved.get("shapes", group["shapes"])] \
                != [tuple(s) for s in group["shapes"]]:
            raise ValueError(f"parameter group {n}: saved Muon shapes differ from this model's")
    shard = state_dict.get("muon_shard")
    if shard is not None:
        me, world = group_rank_size(opt.process_group)
        saved_stage = int(shard.get("zero_stage", 0))
        if (saved_stage > 0) != opt.sharded:  # stages 1 and 2 keep the same state layout
            raise ValueError(f"optimizer state of rank {shard['rank']} was saved with "
                             f"parallel.zero_stage={saved_stage}, this run has "
                             f"parallel.zero_stage={opt.zero_stage}: master weights and state "
                             f"are {'sharded' if saved_stage else 'replicated'} there; resume "
                             f"with a matching stage")
        if shard["world"] != world or shard["rank"] != me or \
                list(shard["owners"]) != list(opt.owners()) or \
                list(shard.get("all_owners", [])) != (list(opt.all_owners())
                                                      if opt.sharded else []):
            raise ValueError(f"sharded optimizer state of rank {shard['rank']}/{shard['world']} "
                             f"cannot be loaded on rank {me}/{world} (or the ownership plan "
                             f"changed); save a consolidated state_dict() to change world size")


def _restore(key: str, value: Any, p: torch.Tensor) -> Any:
    """A private copy on the parameter's device, dtype kept; `step` counters stay on CPU."""
    if not torch.is_tensor(value):
        return value
    if key == "step":
        return value.detach().to("cpu", copy=True)
    return value.detach().to(p.device, copy=True)
